"""Single-stream decode: tokens per second of one sequence, ferry against transformers and llama.cpp.

Question: generating for one user, how fast does each engine decode, at the same precision, same weights,
same threads? Each run: a fresh --prompt-len-token prompt, then time(--max-tokens tokens) - time(1 token), so
the prefill is not counted: (max_tokens - 1) / that difference. Batch-1 decode is memory-bound: the record
also has the weight bytes streamed per second (weights x tok/s) against the machine's measured bandwidth.

    python -m bench decode                         # default: qwen2.5-0.5b, bfloat16 + float32, 2 threads (~4 min)
    python -m bench decode --model llama-1b        # Llama-3.2-1B shape (~8 min)
    python -m bench decode --smoke                 # tiny model, 1 thread (< 1 min), bench/.cache/smoke/
"""
from __future__ import annotations

import argparse
import random
from contextlib import ExitStack

from bench.offline import Scenario, add_arguments, parse_args, timed, warm_up


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="ferry bench decode", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap, dtypes="bfloat16,float32", runs=5)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=64)
    args = parse_args(ap, argv, prompt_len=16, max_tokens=8, dtypes="float32")
    sc = Scenario("decode", "single-stream decode tok/s: ferry vs transformers generate vs llama.cpp", args)
    sc.parity()
    rng = random.Random(0)
    vocab = sc.cfg["vocab_size"]
    n_params = None
    for dtype in args.dtypes.split(","):
        with ExitStack() as stack:
            workers = sc.workers(stack, dtype, args.prompt_len + args.max_tokens, 1, args.prompt_len + args.max_tokens + 16)
            warm_up(workers, "decode", prompt=[5] * args.prompt_len, max_tokens=min(8, args.max_tokens))
            prompts = iter([[rng.randrange(3, vocab) for _ in range(args.prompt_len)] for _ in range(64 * args.runs)])
            fns = {n: timed(w, args.timeout, "decode", "tok_s", lambda: {"prompt": next(prompts),
                                                                          "max_tokens": args.max_tokens})
                   for n, w in workers.items()}
            c = sc.case(f"decode, {args.prompt_len}-token prompt, {args.max_tokens} tokens", dtype, "tok/s", fns)
            n_params = n_params or weight_params(sc.cfg)
            width = 4 if dtype == "float32" else 2
            c["weight_gbs"] = {n: s["median"] * n_params * width / 1e9 for n, s in c["engines"].items() if "median" in s}
    sc.record["weight_params"] = n_params
    sc.save("decode tokens/s (higher is better)")


def weight_params(cfg: dict) -> int:
    """Parameters read per decoded token: every dense weight, routed experts counted at top-k."""
    D, I, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    hd = cfg.get("head_dim") or D // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg.get("num_key_value_heads", cfg["num_attention_heads"]) * hd
    ffn = 3 * D * I * cfg.get("num_experts_per_tok", 1)
    head = cfg["vocab_size"] * D
    return L * (D * (q + 2 * kv) + q * D + ffn) + head


if __name__ == "__main__":
    main()
