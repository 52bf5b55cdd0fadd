"""Offline throughput: many requests of mixed lengths at once, output tokens per second.

Question: given a batch job (--num-requests requests, prompts and outputs of mixed lengths, all submitted at
once), how many output tokens per second does each engine produce, at the same precision, same weights, same
threads? Each engine batches its own best way: ferry continuous batching (up to --num-requests sequences at
once), llama.cpp one llama_batch over all sequences with a unified KV cache (its `batched` example), transformers
static batches of --hf-batch-size sorted by prompt length, each generating its longest asked-for output (only
the asked-for tokens count). Greedy, end-of-sequence disabled. Every run draws fresh prompts (seeded, so the
same for every engine within a round), so no prefix cache helps.

    python -m bench throughput                     # default: qwen2.5-0.5b, bfloat16, 32 requests (~8 min)
    python -m bench throughput --dtypes float32 --num-requests 16 --out throughput-f32
    python -m bench throughput --smoke             # tiny model, 1 thread (< 1 min), bench/.cache/smoke/
"""
from __future__ import annotations

import argparse
import random
from contextlib import ExitStack

from bench.common import parse_range
from bench.offline import Scenario, add_arguments, parse_args, timed, warm_up


def workload(n: int, input_len: tuple[int, int], output_len: tuple[int, int], vocab: int, seed: int) -> dict:
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, vocab) for _ in range(rng.randint(*input_len))] for _ in range(n)]
    return {"prompts": prompts, "max_tokens": [rng.randint(*output_len) for _ in range(n)]}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="ferry bench throughput", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap, dtypes="bfloat16", runs=3)
    ap.add_argument("--num-requests", type=int, default=32, help="requests per job, all submitted at once (16+)")
    ap.add_argument("--input-len", default="32:256", help="prompt tokens, uniform in lo:hi")
    ap.add_argument("--output-len", default="32:128", help="output tokens, uniform in lo:hi")
    args = parse_args(ap, argv, num_requests=16, input_len="4:48", output_len="2:12", dtypes="float32")
    sc = Scenario("throughput", "offline throughput, many mixed-length requests: ferry vs transformers vs llama.cpp",
                  args)
    sc.parity()
    vocab = sc.cfg["vocab_size"]
    inp, outp = parse_range(args.input_len), parse_range(args.output_len)
    n = args.num_requests
    for dtype in args.dtypes.split(","):
        with ExitStack() as stack:
            workers = sc.workers(stack, dtype, n * (inp[1] + outp[1]), n, inp[1] + outp[1] + 16)
            warm_up(workers, "generate", **workload(min(n, 4), inp, outp, vocab, seed=10**6))
            # one job per round, the same for every engine in the round: (round, engine) -> seed
            calls: dict[str, int] = {}

            def job(engine: str) -> dict:
                calls[engine] = calls.get(engine, 0) + 1
                return workload(n, inp, outp, vocab, seed=calls[engine])

            fns = {e: timed(w, args.timeout, "generate", "tok_s", lambda e=e: job(e)) for e, w in workers.items()}
            sc.case(f"{n} requests, prompts {args.input_len}, outputs {args.output_len}", dtype, "output tok/s",
                    fns, num_requests=n)
    sc.save("output tokens/s (higher is better)")


if __name__ == "__main__":
    main()
