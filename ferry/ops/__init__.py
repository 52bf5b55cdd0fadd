"""CPU kernels for ferry: one module per kernel, each with ``available()``, ``unavailable_reason()`` and its ops,
which take the module's own fallback wherever the kernel does not run.

- ``cpu``: the instruction-set level (``Isa``: portable < avx2 < avx512 < avx512_bf16), detected once; the
  environment variable ``FERRY_ISA`` lowers it (only there is it read).
- ``build``: compiles a C++ extension for one level, cached under ``$FERRY_CACHE_DIR/ops/`` (default
  ``~/.cache/ferry/ops/``) in a folder keyed by the level, the sources, the flags and the toolchain.
- ``kernel``: ``NativeKernel``, one extension chosen for the level in force (never above the CPU's), with the
  reason when its module falls back.
- ``gemv``: small-M linear for decode (a body per level: AVX-512 (+BF16), AVX2+FMA, portable vector extensions). ``paged_attention``: decode attention read
  from the paged KV cache (plain, int8, depth-masked). ``fused``: residual add + RMSNorm, SiLU-and-multiply,
  rotary. ``read_pool``: reader threads for the expert store. ``quant``: weight-only int8/int4 weights (stored form,
  ``prepare``) on ``qgemv``'s kernel.

``warm_up()`` loads (building on a miss) every kernel once; the engine calls it at start so no request pays a
compile. Without it each kernel loads on its first use.
"""
from __future__ import annotations

import logging
from types import ModuleType

from ferry.ops import cpu, fused, gemv, paged_attention, quant, read_pool

log = logging.getLogger("ferry")

KERNELS: dict[str, ModuleType] = {  # every kernel module; each has available() and unavailable_reason()
    "gemv": gemv, "paged_attention": paged_attention, "fused": fused, "read_pool": read_pool, "quant": quant,
}


def warm_up() -> dict[str, str | None]:
    """Load every kernel for the level in force (compiling those not in the build cache, with a line on stderr for
    each); returns each kernel's reason for falling back, None where it runs. Logged once."""
    reasons = {name: module.unavailable_reason() for name, module in KERNELS.items()}
    running = [name for name, reason in reasons.items() if reason is None]
    log.info("ferry: CPU kernels at %s: %s running", cpu.describe(), ", ".join(running) or "none")
    for name, reason in reasons.items():
        if reason is not None:
            log.info("ferry: kernel %s falls back: %s", name, reason)
    return reasons
