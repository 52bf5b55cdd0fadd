"""Prefill: prompt tokens per second up to the first output token, at 512, 2K and 8K tokens.

Question: how fast does each engine read a long prompt (time to first token of one request), at the same
precision, same weights, same threads? Every call gets a fresh random prompt (no prefix-cache hit), and the
number is prompt tokens / time to the first token. Engines prefill their own way: ferry in chunks of its
token budget (--ferry-opt max_num_batched_tokens=N to change it), llama.cpp in n_batch (512) ubatches,
transformers in one forward. A length past the model's context is n/a for every engine; an engine over
--timeout for a length is n/a there (with the reason in the table).

    python -m bench prefill                        # default: qwen2.5-0.5b, bfloat16, 512/2048/8192 (~7 min)
    python -m bench prefill --dtypes float32 --out prefill-f32
    python -m bench prefill --smoke                # tiny model, 1 thread (< 1 min), bench/.cache/smoke/
"""
from __future__ import annotations

import argparse
import random
from contextlib import ExitStack

from bench.offline import Scenario, add_arguments, parse_args, timed, warm_up


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="ferry bench prefill", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap, dtypes="bfloat16", runs=3)
    ap.add_argument("--lengths", default="512,2048,8192", help="prompt lengths in tokens")
    args = parse_args(ap, argv, lengths="64,256", dtypes="float32")
    sc = Scenario("prefill", "prefill tok/s at 512, 2K, 8K tokens: ferry vs transformers vs llama.cpp", args)
    sc.parity()
    rng = random.Random(0)
    vocab, max_pos = sc.cfg["vocab_size"], sc.cfg["max_position_embeddings"]
    lengths = [int(x) for x in args.lengths.split(",")]
    longest = max(n for n in lengths if n < max_pos) if any(n < max_pos for n in lengths) else 16
    for dtype in args.dtypes.split(","):
        with ExitStack() as stack:
            workers = sc.workers(stack, dtype, longest + 1, 1, longest + 16)
            warm_up(workers, "prefill", prompt=[5] * min(longest, 512))
            for n in lengths:
                label = f"prefill {n} tokens"
                if n >= max_pos:
                    why = f"longer than the model's context ({max_pos})"
                    sc.case(label, dtype, "tok/s", {e: why for e in workers}, prompt_len=n)
                    continue
                fresh = (lambda n=n: {"prompt": [rng.randrange(3, vocab) for _ in range(n)]})
                fns = {e: timed(w, args.timeout, "prefill", "tok_s", fresh) for e, w in workers.items()}
                sc.case(label, dtype, "tok/s", fns, prompt_len=n)
    sc.save("prefill tokens/s (higher is better)")


if __name__ == "__main__":
    main()
