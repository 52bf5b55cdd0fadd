"""What the scenarios that compare engines offline share (decode, prefill, throughput, memory): arguments, the
model, the float32 parity gate, engine workers, interleaved measurement of one case, the record and its plot.

A scenario is a list of cases (one measured quantity each, e.g. "prefill 2048 tokens, bfloat16"); a case runs
every engine --runs times, alternating engines with a rotating first one, and keeps per engine the runs with
median/min/max, and per peer the ratio ferry/peer of each round. An engine that cannot run a case (no GGUF
export for the architecture, longer than the model's context, over --timeout, an error) is kept in the case
with the reason, which the README table prints instead of a number."""
from __future__ import annotations

import argparse
import json
import math
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Callable

from bench.common import interleaved, memory_bandwidth_gbs, new_record, paired, result_path
from bench.engines import ENGINES, Unavailable, Worker, start
from bench.engines.worker import WorkerError
from bench.models import SHAPES, resolve

SMOKE_MODEL = "tiny-qwen2"


def add_arguments(ap: argparse.ArgumentParser, dtypes: str = "bfloat16", runs: int = 3) -> None:
    ap.add_argument("--model", default="qwen2.5-0.5b",
                    help=f"a shape ({', '.join(SHAPES)}; random weights, bench/models.py), tiny-qwen2 / tiny-llama "
                         "/ tiny-olmoe, or a Hugging Face folder")
    ap.add_argument("--engines", default=",".join(ENGINES), help=f"comma list of {', '.join(ENGINES)}")
    ap.add_argument("--dtypes", default=dtypes, help="comma list of bfloat16, float32 (llama.cpp: bf16 / f32 GGUF)")
    ap.add_argument("--threads", type=int, default=2, help="threads of every engine")
    ap.add_argument("--runs", type=int, default=runs, help="measured runs per engine and case (after a warm-up)")
    ap.add_argument("--timeout", type=float, default=600.0,
                    help="seconds one engine may take for one measured call; past it the engine is n/a for the case")
    ap.add_argument("--hf-batch-size", type=int, default=16, help="transformers' static batch for offline jobs")
    ap.add_argument("--ferry-opt", action="append", default=[], metavar="KEY=VALUE",
                    help="extra ferry.LLM keyword, e.g. --ferry-opt max_num_batched_tokens=1024 (repeatable)")
    ap.add_argument("--out", help="results name: bench/results/<out>.{json,png} (default: the scenario's name)")
    ap.add_argument("--smoke", action="store_true",
                    help=f"{SMOKE_MODEL}, 1 thread, tiny sizes, 1 run (< 1 min): checks the code, not the speed; "
                         "writes bench/.cache/smoke/<scenario>.{json,png}")


def parse_args(ap: argparse.ArgumentParser, argv: list[str] | None, **smoke_sizes) -> argparse.Namespace:
    """The scenario's arguments; with --smoke, the tiny model, one thread, one run and the scenario's tiny sizes,
    each only where the command line did not say (`--smoke --model llama-1b --dtypes bfloat16` keeps those)."""
    args = ap.parse_args(argv)
    if args.smoke:
        smoke = {"model": SMOKE_MODEL, "threads": 1, "runs": 1, **smoke_sizes}
        unset = object()
        given = ap.parse_args(argv, namespace=argparse.Namespace(**{k: unset for k in smoke}))
        for k, v in smoke.items():
            if getattr(given, k) is unset:  # argparse fills only attributes the namespace lacks
                setattr(args, k, v)
    return args


def model_config(model: Path) -> dict:
    return json.loads((model / "config.json").read_text())


def kv_bytes(cfg: dict, dtype: str, num_tokens: int, num_seqs: int) -> int:
    """KV cache bytes for num_tokens tokens over num_seqs sequences (each rounded up to 16-token blocks)."""
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    per_token = 2 * cfg["num_hidden_layers"] * cfg.get("num_key_value_heads", cfg["num_attention_heads"]) * head_dim
    return (num_tokens + 16 * num_seqs) * per_token * (4 if dtype == "float32" else 2)


def engine_options(name: str, args, cfg: dict, dtype: str, num_tokens: int, num_seqs: int, max_len: int) -> dict:
    """Per engine, what the job needs: ferry's KV budget sized to the job (1.25x + 64 MB, as llama.cpp's
    context is), its sequence and length limits; transformers' static batch size."""
    if name == "ferry":
        mb = int(1.25 * kv_bytes(cfg, dtype, num_tokens, num_seqs) / 2**20) + 64
        opts = {"kv_cache_memory": f"{mb}M", "max_num_seqs": max(num_seqs, 1), "max_model_len": max_len}
        for kv in args.ferry_opt:
            k, _, v = kv.partition("=")
            opts[k] = int(v) if v.lstrip("-").isdigit() else v
        return opts
    if name == "transformers":
        return {"batch_size": args.hf_batch_size}
    return {}


class Scenario:
    """One run of a scenario: the record it fills, the model, the engines, the parity gate."""

    def __init__(self, name: str, question: str, args: argparse.Namespace) -> None:
        self.name, self.args = name, args
        self.started = time.perf_counter()
        self.record = new_record(name, question, args)
        self.model = resolve(args.model)
        self.cfg = model_config(self.model)
        self.engines = args.engines.split(",")
        if unknown := set(self.engines) - set(ENGINES):
            raise SystemExit(f"unknown engines {unknown}; one of {ENGINES}")
        self.unavailable: dict[str, str] = {}   # engine -> why it cannot run this model at all
        self.record.update({"model": str(self.model), "model_name": self.model.name, "engines": self.engines,
                            "model_config": self.cfg, "cases": []})

    def parity(self) -> None:
        """float32 greedy tokens and logprobs of every engine against ferry's; stops the scenario on a mismatch."""
        from bench.parity import check, describe
        t = time.perf_counter()
        r = check(self.model, self.engines, self.args.threads)
        self.record["parity_float32"] = r
        self.unavailable.update(r["unavailable"])
        print(f"[{self.name}] float32 parity ({time.perf_counter() - t:.0f}s): {describe(r)}", flush=True)
        if not r["ok"]:
            self.save()
            raise SystemExit(f"[{self.name}] engines disagree with ferry at float32; not timing (see the JSON)")
        if "llama.cpp" in self.engines and "llama.cpp" not in self.unavailable:
            from bench.peers.env import versions
            self.record["peers"] = versions()
        self.record["bandwidth_gbs_before"] = memory_bandwidth_gbs()

    def workers(self, stack: ExitStack, dtype: str, num_tokens: int, num_seqs: int, max_len: int) -> dict:
        """engine -> running Worker at dtype (closed with the stack), or the reason it is not running."""
        out: dict[str, Worker | str] = {}
        for name in self.engines:
            if name in self.unavailable:
                out[name] = self.unavailable[name]
                continue
            opts = engine_options(name, self.args, self.cfg, dtype, num_tokens, num_seqs, max_len)
            try:
                out[name] = stack.enter_context(start(name, self.model, dtype, self.args.threads, **opts))
                print(f"[{self.name}] {name} {dtype} loaded in {out[name].info['load_s']:.0f}s", flush=True)
            except (Unavailable, WorkerError, TimeoutError) as e:
                out[name] = str(e).splitlines()[0][:200]
        return out

    def case(self, label: str, dtype: str, metric: str, fns: dict[str, Callable[[], float] | str],
             higher_is_better: bool = True, **extra) -> dict:
        """Measure one case: fns maps engine -> a call returning the value, or to the reason it cannot run."""
        runnable = {n: f for n, f in fns.items() if callable(f)}
        why = {n: f for n, f in fns.items() if not callable(f)}

        def guarded(name: str, fn: Callable[[], float]) -> Callable[[], float]:
            def call() -> float:
                if name in why:
                    return math.nan
                try:
                    return fn()
                except TimeoutError:
                    why[name] = f"over the {self.args.timeout:.0f} s limit per run"
                except WorkerError as e:
                    why[name] = str(e).splitlines()[0][:200]
                return math.nan
            return call

        values = interleaved({n: guarded(n, f) for n, f in runnable.items()}, self.args.runs)
        c = {"label": label, "dtype": dtype, "metric": metric, "higher_is_better": higher_is_better, **extra,
             **paired({n: v for n, v in values.items() if n not in why})}
        c["engines"].update({n: {"unavailable": r} for n, r in why.items()})
        self.record["cases"].append(c)
        shown = {n: (round(s["median"], 1) if "median" in s else s["unavailable"]) for n, s in c["engines"].items()}
        print(f"[{self.name}] {label} ({dtype}) {metric}: {shown}", flush=True)
        return c

    def save(self, ylabel: str = "", log: bool = False) -> Path:
        from bench.common import plot_cases
        self.record["bandwidth_gbs_after"] = memory_bandwidth_gbs()
        self.record["duration_s"] = time.perf_counter() - self.started
        path = result_path(self.name, self.args.smoke, self.args.out)
        path.write_text(json.dumps(self.record, indent=2, default=str))
        if self.record["cases"]:
            plot_cases(self.record, path.with_suffix(".png"), ylabel, log)
        print(f"[{self.name}] saved {path} (+ .png) after {self.record['duration_s']:.0f} s")
        return path


def timed(worker: Worker | str, timeout: float, op: str, key: str, make_kw: Callable[[], dict]) -> Callable[[], float] | str:
    """A call that runs worker op with fresh arguments make_kw() each time and returns reply[key]; a worker
    that is a reason (not running) stays that reason."""
    if isinstance(worker, str):
        return worker
    return lambda: worker.call(op, timeout=timeout, **make_kw())[key]


def warm_up(workers: dict, op: str, **kw) -> None:
    """One untimed call per running engine (kernels, allocator, caches); a failure marks the engine n/a."""
    for name, w in list(workers.items()):
        if isinstance(w, Worker):
            try:
                w.call(op, **kw)
            except (WorkerError, TimeoutError) as e:
                workers[name] = f"failed the warm-up: {str(e).splitlines()[0][:200]}"
