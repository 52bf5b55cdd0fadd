"""Shared benchmark plumbing: machine facts, memory bandwidth, interleaved repeated timing, summaries, the JSON
record of a scenario and its plot. Every scenario writes `bench/results/<scenario>.json` (or, with --smoke,
`bench/.cache/smoke/<scenario>.json`, so smoke runs never overwrite real results) and a PNG beside it."""
from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
SMOKE = ROOT / ".cache" / "smoke"


# The CPU flags a record keeps: the instruction sets that decide which kernels run (x86 and ARM names).
_ISA_FLAGS = ("sse", "avx", "fma", "f16c", "amx", "vnni", "bf16", "asimd", "sve", "i8mm", "dotprod")


def machine() -> dict:
    """CPU model and instruction-set flags, the kernel level in force, cores, memory, Python and library versions,
    git sha, command line."""
    import torch
    import transformers
    cpu = ""
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=ROOT).stdout.strip()
    except OSError:
        sha = ""
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    from ferry.ops import cpu as isa
    return {"cpu": cpu, "cpu_flags": sorted(f for f in isa.cpu_flags() if f.startswith(_ISA_FLAGS)),
            "isa": isa.isa().label, "isa_in_force": isa.describe(),  # FERRY_ISA shows here when it lowers the level
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),  # ATEN_CPU_CAPABILITY lowers torch's
            "cores": os.cpu_count(), "memory_bytes": mem, "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "git": sha, "argv": sys.argv,
            "load_average": os.getloadavg()}


def memory_bandwidth_gbs(size_mb: int = 512, reps: int = 5) -> float:
    """DRAM bandwidth: copying a buffer far larger than the L3 cache (bytes read + written, best of reps)."""
    import torch
    src = torch.ones(size_mb * (1 << 20) // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.numel() * 4 / best / 1e9


def interleaved(fns: dict[str, Callable[[], float]], runs: int) -> dict[str, list[float]]:
    """Call each fn once per round, alternating (A, B, C, A, B, C, ...) with the first one rotating per round
    (B, C, A in round 2) so that no engine always runs right after the same other one."""
    names = list(fns)
    out: dict[str, list[float]] = {k: [] for k in names}
    for r in range(runs):
        for name in names[r % len(names):] + names[:r % len(names)]:
            out[name].append(fns[name]())
    return out


def summary(values: list[float]) -> dict:
    ok = [v for v in values if not math.isnan(v)]
    if not ok:
        return {"median": math.nan, "min": math.nan, "max": math.nan, "runs": values}
    return {"median": statistics.median(ok), "min": min(ok), "max": max(ok), "runs": values}


def parse_range(s: str) -> tuple[int, int]:
    """"32:256" -> (32, 256); "64" -> (64, 64)."""
    lo, _, hi = s.partition(":")
    return int(lo), int(hi or lo)


def ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(a) and not math.isnan(b) else math.nan


def paired(values: dict[str, list[float]], ref: str = "ferry") -> dict:
    """Per engine the summary of its runs; per peer the summary of ref/peer ratios of the same round."""
    out: dict = {"engines": {k: summary(v) for k, v in values.items()}, "ratios": {}}
    if ref in values:
        for peer, v in values.items():
            if peer != ref:
                out["ratios"][peer] = summary([ratio(a, b) for a, b in zip(values[ref], v)])
    return out


def result_path(scenario: str, smoke: bool, out: str | None = None) -> Path:
    folder = SMOKE if smoke else RESULTS
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{out or scenario}.json"


def save(name: str, record: dict, smoke: bool = False) -> Path:
    path = result_path(name, smoke)
    path.write_text(json.dumps(record, indent=2, default=str))
    return path


def new_record(scenario: str, question: str, args) -> dict:
    """The fields every scenario records: what it asks, the machine, versions, command and configuration."""
    return {"scenario": scenario, "question": question, "machine": machine(),
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                       if k != "func"}}


def plot_cases(record: dict, path: Path, ylabel: str, log: bool = False) -> None:
    """One bar group per case (with min–max whiskers), one bar per engine; n/a cases are left blank and
    labelled. record["cases"] is the list every offline scenario writes (see bench/offline.py)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cases = record["cases"]
    engines = record["engines"]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(cases) * len(engines) / 2), 4.2))
    width = 0.8 / len(engines)
    for i, name in enumerate(engines):
        xs, med, lo, hi = [], [], [], []
        for j, c in enumerate(cases):
            s = c["engines"].get(name, {})
            if "median" in s and not math.isnan(s["median"]):
                xs.append(j + i * width)
                med.append(s["median"])
                lo.append(s["median"] - s["min"])
                hi.append(s["max"] - s["median"])
            else:
                ax.text(j + i * width, 0, "n/a", ha="center", va="bottom", fontsize=7, rotation=90)
        ax.bar(xs, med, width, yerr=[lo, hi], capsize=2, label=name)
    dtypes = {c.get("dtype") for c in cases}
    labels = [c["label"] + (f"\n{c['dtype']}" if len(dtypes) > 1 else "") for c in cases]
    ax.set_xticks([j + width * (len(engines) - 1) / 2 for j in range(len(cases))], labels, fontsize=8)
    if log:
        ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    threads = record["config"].get("threads")
    dtype = f" ({dtypes.pop()})" if len(dtypes) == 1 else ""
    ax.set_title(f"{record['scenario']}: {record.get('model_name', '')}{dtype}, {threads} thread"
                 f"{'s' * (threads != 1)}, median of {record['config'].get('runs')} (min–max)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(str(path), dpi=120)
    plt.close(fig)


def measured_on(record: dict) -> str:
    """'Measured on <CPU> (<ISA in force>), <cores> cores, commit `<sha>`': the run a docs table comes from."""
    m = record["machine"]
    return (f"Measured on {m.get('cpu', '?')} ({m.get('isa_in_force', m.get('isa', '?'))}), {m.get('cores', '?')} "
            f"cores, commit `{m.get('git', '?')}`")
