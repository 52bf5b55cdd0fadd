"""Measured side of `ferry roofline`: run the real step in a `ferry.LLM` (the prefill of B prompts of P tokens,
or decode steps of B requests with kv_len tokens of context) and time it whole, then per operator under
torch.profiler: the model's named scopes (ferry/models/scopes.py) are the operators of the analysis.

Whole-step times come from steps run without the profiler (it adds a little per recorded op); per-operator
times from profiled steps; what no scope covers (scheduler, input tensors, sampling, output processing, Python)
is the `sampling` row, the step's remainder."""
from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

from torch.profiler import ProfilerActivity, profile

from ferry.engine.llm import LLM
from ferry.request import SamplingParams
from ferry.roofline.analysis import Workload

SCOPES = ("embedding", "attn_norm", "qkv_proj", "rotary", "attention", "o_proj", "mlp_norm", "gate_up", "act",
          "down", "router", "experts", "final_norm", "lm_head")
REST = "sampling"  # the step's time outside every scope


@dataclass
class Measured:
    step_s: float  # median wall time of one step without the profiler
    ops_s: dict[str, float] = field(default_factory=dict)  # median per operator of the profiled steps, + REST
    step_runs: list[float] = field(default_factory=list)


def llm_options(w: Workload, threads: int | None, kv_policy: str, extra: dict | None = None) -> dict:
    """LLM(...) keywords for running workload w: a step budget that fits the whole prefill, KV for all of it."""
    tokens = w.batch_size * (max(w.prompt_len, w.kv_len) + 64)
    opts = dict(dtype=w.dtype, threads=threads, kv_policy=kv_policy, max_num_seqs=max(64, w.batch_size),
                max_num_batched_tokens=max(512, w.num_tokens if w.phase == "prefill" else w.batch_size),
                enable_prefix_caching=False, max_model_len=max(w.prompt_len, w.kv_len) + 128)
    if w.quantization != "none":
        opts["quantization"] = w.quantization
    opts.update(extra or {})
    return opts


class CannotRun(Exception):
    """The step cannot be run as analysed (the analysis stands; the measurement is missing)."""


def open_llm(model: str, options: dict) -> LLM:
    """ferry.LLM(model, **options); CannotRun where this build has no `quantization` keyword."""
    try:
        return LLM(model, **options)
    except TypeError as e:
        if "quantization" in options and "quantization" in str(e):
            raise CannotRun(f"this ferry cannot run --quantization {options['quantization']} (LLM rejected the "
                            f"keyword: {e}); the analysis stands, run without --quantization to measure") from None
        raise


def measure(llm: LLM, w: Workload, steps: int = 5, seed: int = 0,
            progress: Callable[[str], None] = lambda msg: None) -> Measured:
    """Time `steps` clean and `steps` profiled steps of workload w on llm (after one warm-up step)."""
    rng = random.Random(seed)
    vocab = llm.view().vocab_size
    fresh = lambda n: [rng.randrange(3, vocab) for _ in range(n)]  # noqa: E731 (random ids: no prefix is shared)
    params = SamplingParams(max_tokens=4 * steps + 8, temperature=0.0, ignore_eos=True)
    eng = llm.engine
    if w.phase == "decode":
        progress(f"prefill of {w.batch_size} x {w.kv_len} tokens...")
        ids = [_add(eng, fresh(max(w.kv_len, 1)), params) for _ in range(w.batch_size)]
        while not all(r.decoding for r in llm.view().running) or llm.view().num_waiting:
            eng.step()
        one = eng.step
    else:
        ids = []

        def one() -> None:
            ids.extend(_add(eng, fresh(w.prompt_len), params) for _ in range(w.batch_size))
            eng.step()  # the prefill of all of them, then they are not needed
            for rid in ids:
                eng.abort_request(rid)
            ids.clear()
    try:
        progress(f"{w.phase}: warm-up, {steps} timed steps, {steps} profiled steps...")
        one()
        runs = []
        for _ in range(steps):
            t = time.perf_counter()
            one()
            runs.append(time.perf_counter() - t)
        ops = _profiled(one, steps)
    finally:
        for rid in ids:
            eng.abort_request(rid)
    return Measured(statistics.median(runs), ops, runs)


def _add(eng, prompt: list[int], params: SamplingParams) -> str:
    rid = f"roofline-{id(prompt)}-{time.perf_counter_ns()}"
    eng.add_request(rid, prompt, params)
    return rid


def _profiled(one: Callable[[], None], steps: int) -> dict[str, float]:
    """Median per operator (seconds) over `steps` profiled steps; REST = step wall time - the scopes."""
    per_step: list[dict[str, float]] = []
    for _ in range(steps):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t = time.perf_counter()
            one()
            wall = time.perf_counter() - t
        per_step.append(scope_times(prof.events(), wall))
    names = {n for d in per_step for n in d}
    return {n: statistics.median(d.get(n, 0.0) for d in per_step) for n in names}


def scope_times(events, wall_s: float) -> dict[str, float]:
    """Seconds per scope name, each event counted at its outermost scope (a MoE's expert gate_up is `experts`)."""
    out: dict[str, float] = {}
    for e in events:
        if e.name not in SCOPES or _inside_scope(e):
            continue
        out[e.name] = out.get(e.name, 0.0) + e.cpu_time_total * 1e-6
    out[REST] = max(0.0, wall_s - sum(out.values()))
    return out


def _inside_scope(e) -> bool:
    p = e.cpu_parent
    while p is not None:
        if p.name in SCOPES:
            return True
        p = p.cpu_parent
    return False
