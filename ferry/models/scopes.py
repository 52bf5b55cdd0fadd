"""Named scopes around a step's operators (qkv_proj, attention, gate_up, lm_head...), so `ferry roofline`
(ferry/roofline/measure.py) can time each under torch.profiler. Outside a profiler a scope is one shared null
context (a flag read), so the forward pays nothing measurable for them."""
from __future__ import annotations

import contextlib

from torch.autograd import profiler

_NULL = contextlib.nullcontext()


def scope(name: str) -> contextlib.AbstractContextManager:
    """torch.profiler's record_function(name) while a profiler runs, else a no-op."""
    return profiler.record_function(name) if profiler._is_profiler_enabled else _NULL
