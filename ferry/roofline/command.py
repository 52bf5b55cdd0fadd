"""The `ferry roofline MODEL` subcommand: its flags and what it runs (ferry/cli.py only registers it)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ferry.config import ModelConfig
from ferry.kvcache.policies import KV_POLICIES
from ferry.roofline.analysis import QUANTIZATIONS, Workload

if TYPE_CHECKING:
    from ferry.roofline.hardware import HardwareProfile


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="local Hugging Face folder (its config.json is analysed; the weights run)")
    p.add_argument("--phase", default="both", choices=("decode", "prefill", "both"), help="which step (default: both)")
    p.add_argument("--batch-size", type=int, default=1, help="requests in the step (default: 1)")
    p.add_argument("--prompt-len", type=int, default=128, help="prefill: prompt tokens per request (default: 128)")
    p.add_argument("--kv-len", type=int, default=None, help="decode: tokens of KV per request (default: prompt-len)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="weight and activation dtype (auto: the checkpoint's; float16 runs as bfloat16)")
    p.add_argument("--quantization", default="none", choices=QUANTIZATIONS, help="weight-only int8/int4 (default: none)")
    p.add_argument("--quantization-group-size", type=int, default=None,
                   help="inputs per float16 scale (default: int4 32, int8 per output channel)")
    p.add_argument("--kv-policy", default="full", choices=tuple(KV_POLICIES), help="KV policy (default: full)")
    p.add_argument("--kv-budget", type=float, default=None, help="the KV policy's budget (tokens, or a fraction <= 1)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's choice)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per workload, and as many profiled (default: 5)")
    p.add_argument("--no-run", action="store_true", help="the analysis only: do not run the model")
    p.add_argument("--hardware", type=Path, default=None,
                   help="a hardware profile JSON (as cached) to use instead of this machine's measurement")
    p.add_argument("--remeasure", action="store_true", help="measure this machine again (ignore the cached profile)")
    p.add_argument("--plot", type=Path, default=None, help="write the roofline chart (PNG)")
    p.add_argument("--json", type=Path, default=None, help="write the rows, workload and hardware as JSON")


def workloads(args: argparse.Namespace, cfg: ModelConfig) -> list[Workload]:
    dtype = args.dtype if args.dtype != "auto" else ("float32" if cfg.checkpoint_dtype == "float32" else "bfloat16")
    phases = ("prefill", "decode") if args.phase == "both" else (args.phase,)
    kv_len = args.prompt_len if args.kv_len is None else args.kv_len
    return [Workload(phase, args.batch_size, args.prompt_len, kv_len, dtype, args.quantization,
                     args.quantization_group_size) for phase in phases]


def hardware(args: argparse.Namespace) -> "HardwareProfile":
    """--hardware's profile, else this machine's (cached, or measured now with progress on stderr)."""
    from ferry.roofline.hardware import HardwareProfile, load_or_measure

    if args.hardware is not None:
        try:
            return HardwareProfile.from_json(json.loads(args.hardware.read_text()))
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise SystemExit(f"error: cannot read hardware profile {args.hardware}: {e}; write one with "
                             f"`ferry roofline MODEL --json OUT` (its `hardware` field) or leave --hardware out")
    say = lambda msg: print(f"roofline: measuring this machine: {msg}", file=sys.stderr, flush=True)  # noqa: E731
    return load_or_measure(args.threads, args.remeasure, progress=say)


def run_command(args: argparse.Namespace) -> int:
    from ferry.roofline.report import plot, print_table
    from ferry.roofline.run import roofline, to_json

    for name in ("batch_size", "prompt_len", "steps"):
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    cfg = ModelConfig.from_hf(args.model)
    hw = hardware(args)
    kv_opts = {} if args.kv_budget is None else {"kv_budget": args.kv_budget}
    say = lambda msg: print(f"roofline: {msg}", file=sys.stderr, flush=True)  # noqa: E731
    results = roofline(args.model, workloads(args, cfg), hw, args.kv_policy, kv_opts, run=not args.no_run,
                       steps=args.steps, progress=say)
    for r in results:
        print_table(r)
    if args.json:
        args.json.write_text(json.dumps(to_json(results), indent=1))
    if args.plot:
        plot(results, hw, args.plot)
    missing = {r["not_measured"] for r in results if "not_measured" in r}
    for why in missing:
        print(f"error: {why}", file=sys.stderr)
    return 2 if missing else 0
