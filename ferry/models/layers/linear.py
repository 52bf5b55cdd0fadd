"""The one entry point for dense matmuls, so kernels are chosen in one place (ferry.ops)."""
from ferry.ops.gemv import linear

__all__ = ["linear"]
