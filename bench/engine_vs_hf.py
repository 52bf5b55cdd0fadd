"""ferry against Hugging Face transformers `generate`, same weights, same prompts, same threads, one run.

Question: how much faster is ferry's engine core than transformers on this CPU, for single-stream decode,
512-token prefill, and offline throughput with many concurrent requests?
Model: random weights with Qwen2.5-0.5B's shape (vocabulary cut to 32k), float32 and bfloat16.
Before timing, both engines must produce the same greedy tokens in float32.

    python bench/engine_vs_hf.py                # default size; writes bench/results/engine_vs_hf.{json,png}
"""
from __future__ import annotations

import argparse
import json
import random
import time

import torch

from bench.common import RESULTS, interleaved, machine, memory_bandwidth_gbs, save, summary
from bench.models import build


RESULTS_FILE = RESULTS / "engine_vs_hf.json"


def hf_model(path, dtype):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True).eval()


@torch.inference_mode()
def hf_generate(model, prompts: list[list[int]], max_new: int, batch_size: int) -> tuple[float, list[list[int]]]:
    """Seconds for all prompts, in batches (sorted by length to limit padding, left-padded), greedy."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outs: list[list[int]] = [[] for _ in prompts]
    t = time.perf_counter()
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        L = max(len(prompts[i]) for i in idx)
        ids = torch.tensor([[0] * (L - len(prompts[i])) + prompts[i] for i in idx])
        mask = torch.tensor([[0] * (L - len(prompts[i])) + [1] * len(prompts[i]) for i in idx])
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, min_new_tokens=max_new,
                             do_sample=False, pad_token_id=0)
        for row, i in enumerate(idx):
            outs[i] = gen[row, L:].tolist()
    return time.perf_counter() - t, outs


def ferry_generate(llm, prompts: list[list[int]], max_new: int) -> tuple[float, list[list[int]]]:
    from ferry import SamplingParams
    params = SamplingParams(temperature=0, max_tokens=max_new, ignore_eos=True)
    t = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return time.perf_counter() - t, [o.outputs[0].token_ids for o in outs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="qwen2.5-0.5b")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--num-requests-fp32", type=int, default=32, help="float32 is ~4x slower: fewer requests")
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--hf-batch-size", type=int, default=16)
    ap.add_argument("--scenarios", default="decode,prefill,throughput")
    ap.add_argument("--update", action="store_true",
                    help="rerun only --scenarios and keep the other results already in bench/results/engine_vs_hf.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from ferry import LLM

    path = str(build(args.shape))
    rng = random.Random(0)
    vocab = 32000
    prompts = [[rng.randrange(3, vocab) for _ in range(rng.randint(128, 512))] for _ in range(args.num_requests)]
    record = {"question": "ferry vs transformers generate: decode, prefill, throughput", "machine": machine(),
              "num_requests": args.num_requests, "output_len": args.output_len,
              "model": args.shape, "threads": args.threads, "results": {}}
    if args.update and RESULTS_FILE.is_file():
        record["results"] = json.loads(RESULTS_FILE.read_text())["results"]
    record["bandwidth_gbs_before"] = memory_bandwidth_gbs()
    scenarios = args.scenarios.split(",")
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        hf = hf_model(path, dtype)
        llm = LLM(path, dtype=dtype_name, kv_cache_memory="3G", max_num_seqs=64, max_num_batched_tokens=512)
        weight_bytes = sum(p.numel() * p.element_size() for p in llm.engine.runner.model.parameters())
        res = record["results"].setdefault(dtype_name, {})
        res["weight_bytes"] = weight_bytes
        # correctness first: the same greedy tokens (float32 only; bfloat16 rounds differently per engine)
        check = prompts[:4]
        _, want = hf_generate(hf, check, 16, 1)
        _, got = ferry_generate(llm, check, 16)
        res["greedy_match"] = sum(a == b for x, y in zip(want, got) for a, b in zip(x, y)) / (16 * len(check))
        if dtype_name == "float32" and res["greedy_match"] < 1.0:
            raise SystemExit(f"float32 greedy tokens differ from transformers ({res['greedy_match']:.2%}); not timing")
        print(f"[{dtype_name}] greedy agreement with transformers: {res['greedy_match']:.1%}")

        if "decode" in scenarios:  # single stream: 128-token prompt, N new tokens, minus the prefill time
            p, n = [prompts[0][:128]], args.decode_tokens

            def decode_rate(gen):
                t_all, _ = gen(p, n)
                t_one, _ = gen(p, 1)
                return (n - 1) / max(t_all - t_one, 1e-9)
            r = interleaved({"transformers": lambda: decode_rate(lambda q, k: hf_generate(hf, q, k, 1)),
                             "ferry": lambda: decode_rate(lambda q, k: ferry_generate(llm, q, k))}, args.runs)
            res["decode_tok_s"] = {k: summary(v) for k, v in r.items()}
            res["decode_tok_s"]["ratio"] = summary([a / b for a, b in zip(r["ferry"], r["transformers"])])
            res["decode_weight_gbs"] = {k: weight_bytes * v["median"] / 1e9 for k, v in res["decode_tok_s"].items() if k != "ratio"}
            print(f"[{dtype_name}] decode tok/s", {k: round(v["median"], 1) for k, v in res["decode_tok_s"].items()})

        if "prefill" in scenarios:  # time to first token of a 512-token prompt, a new prompt every call
            fresh = iter([[rng.randrange(3, vocab) for _ in range(512)]] for _ in range(4 * args.runs))
            r = interleaved({"transformers": lambda: 512 / hf_generate(hf, next(fresh), 1, 1)[0],
                             "ferry": lambda: 512 / ferry_generate(llm, next(fresh), 1)[0]}, args.runs)
            res["prefill512_tok_s"] = {k: summary(v) for k, v in r.items()}
            res["prefill512_tok_s"]["ratio"] = summary([a / b for a, b in zip(r["ferry"], r["transformers"])])
            print(f"[{dtype_name}] prefill tok/s", {k: round(v["median"], 1) for k, v in res["prefill512_tok_s"].items()})

        if "throughput" in scenarios:  # all requests at once, output tokens per second
            batch = prompts[:args.num_requests_fp32] if dtype_name == "float32" else prompts
            res["num_requests"] = len(batch)
            total = len(batch) * args.output_len
            runs = max(1, args.runs - 1)
            r = interleaved({"transformers": lambda: total / hf_generate(hf, batch, args.output_len, args.hf_batch_size)[0],
                             "ferry": lambda: total / ferry_generate(llm, batch, args.output_len)[0]}, runs)
            res["throughput_tok_s"] = {k: summary(v) for k, v in r.items()}
            res["throughput_tok_s"]["ratio"] = summary([a / b for a, b in zip(r["ferry"], r["transformers"])])
            print(f"[{dtype_name}] throughput tok/s", {k: round(v["median"], 1) for k, v in res["throughput_tok_s"].items()})
        del hf, llm
    record["bandwidth_gbs_after"] = memory_bandwidth_gbs()
    print("saved", save("engine_vs_hf", record))
    plot(record)


def plot(record: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    metrics = [("decode_tok_s", "decode (1 stream)"), ("prefill512_tok_s", "prefill 512"), ("throughput_tok_s", "throughput (64 req)")]
    dtypes = list(record["results"])
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / max(1, len(dtypes))
    for i, d in enumerate(dtypes):
        vals = [record["results"][d].get(m, {}).get("ratio", {}).get("median", 0) for m, _ in metrics]
        ax.bar([j + i * width for j in range(len(metrics))], vals, width, label=d)
    ax.axhline(1.0, color="gray", lw=1, ls="--")
    ax.set_xticks([j + width * (len(dtypes) - 1) / 2 for j in range(len(metrics))], [l for _, l in metrics])
    ax.set_ylabel("ferry / transformers (higher is better)")
    ax.set_title(f"{record['model']} (random weights), {record['threads']} threads")
    ax.legend()
    fig.tight_layout()
    fig.savefig(str(save("engine_vs_hf", record).with_suffix(".png")), dpi=120)


if __name__ == "__main__":
    main()
