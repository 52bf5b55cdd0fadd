import torch
from torch import nn

from ferry.ops.fused import add_rms_norm


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, weight applied in the input dtype (as the HF reference does).
    Called with a second argument, adds it into x in place first (the residual connection)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim, device="meta"), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
        return add_rms_norm(add, x.contiguous() if add is None else x, self.weight, self.eps)
