"""Memory: peak resident memory of each engine for the same job.

Question: how much RAM does each engine need to run the same offline job (the throughput scenario's workload
at --num-requests requests), with the same weights at the same precision? Each run starts every engine in a
fresh process of its own (one after the other, alternating), loads the model, runs the job, and reads the
process's high-water mark (VmHWM from /proc/self/status; getrusage's ru_maxrss would carry the parent's
peak over fork + exec); the peak right after loading is kept too. Every engine's KV cache is sized to the job: llama.cpp's context holds the job's
tokens, ferry's --kv-cache-memory is set to the job's KV bytes x1.25 + 64 MB (ferry allocates its whole KV
budget up front), transformers grows its cache as it goes. The numbers include each runtime (Python + torch
for ferry and transformers, Python + numpy + libllama for llama.cpp).

    python -m bench memory                         # default: qwen2.5-0.5b, bfloat16 + float32 (~5 min)
    python -m bench memory --model olmoe-16e --dtypes bfloat16
    python -m bench memory --smoke                 # tiny model, 1 thread (< 1 min), bench/.cache/smoke/
"""
from __future__ import annotations

import argparse

from bench.engines import Unavailable, start
from bench.engines.worker import WorkerError
from bench.offline import Scenario, add_arguments, parse_args, engine_options
from bench.common import parse_range
from bench.throughput import workload


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="ferry bench memory", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap, dtypes="bfloat16,float32", runs=2)
    ap.add_argument("--num-requests", type=int, default=16)
    ap.add_argument("--input-len", default="32:256", help="prompt tokens, uniform in lo:hi")
    ap.add_argument("--output-len", default="32", help="output tokens, uniform in lo:hi")
    args = parse_args(ap, argv, num_requests=4, input_len="4:48", output_len="4", dtypes="float32")
    sc = Scenario("memory", "peak RSS of each engine for the same job", args)
    sc.parity()
    inp, outp = parse_range(args.input_len), parse_range(args.output_len)
    n = args.num_requests
    job = workload(n, inp, outp, sc.cfg["vocab_size"], seed=0)
    tokens = sum(len(p) for p in job["prompts"]) + sum(job["max_tokens"])
    for dtype in args.dtypes.split(","):
        loaded: dict[str, list[float]] = {}

        def peak(engine: str) -> float:
            """MB at the high-water mark of a fresh process that loaded the model and ran the job."""
            opts = engine_options(engine, args, sc.cfg, dtype, tokens, n, inp[1] + outp[1] + 16)
            try:
                with start(engine, sc.model, dtype, args.threads, **opts) as w:
                    loaded.setdefault(engine, []).append(w.info["hwm_bytes"] / 2**20)
                    w.call("generate", timeout=args.timeout, **job)
                    return w.call("memory")["hwm_bytes"] / 2**20
            except Unavailable as e:
                raise WorkerError(str(e)) from e

        fns = {e: sc.unavailable.get(e) or (lambda e=e: peak(e)) for e in sc.engines}
        c = sc.case(f"peak RSS, {n} requests", dtype, "MB", fns, higher_is_better=False, num_requests=n,
                    job_tokens=tokens)
        c["after_load_mb"] = {e: v for e, v in loaded.items()}
    sc.save("peak resident memory, MB (lower is better)")


if __name__ == "__main__":
    main()
