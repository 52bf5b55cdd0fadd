"""Scenario moe-offload: decode throughput of a MoE model with its experts on disk, against the expert budget.

Question: how much of the all-in-memory decode speed is left when only a fraction of the experts' bytes fits
in RAM, with (a) on-demand loading, (b) LRU + pre-gating prefetch, (c) frequency-correlation eviction +
pre-gating prefetch? Reads bypass the page cache (O_DIRECT, or posix_fadvise DONTNEED), so "disk" is disk.

    python -m bench.moe_offload                    # random Qwen3-MoE-shaped model (built once), batch 1 and 16
    python -m bench.moe_offload --model DIR        # any MoE checkpoint
    python -m bench.moe_offload --smoke            # tiny model, seconds

Writes bench/results/moe_offload.json (or bench/.cache/smoke/moe_offload.json with --smoke): one record per
(budget, mode, batch) with decode tok/s, expert cache hit rate, prefetch precision / recall, bytes read and
I/O stall per generated token, and the config, git sha and machine. Peers (transformers + accelerate disk
offload, llama.cpp with mmap) are not run by this script yet."""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
MODES = {  # name -> engine options
    "on-demand": dict(expert_eviction="lru", expert_prefetch="none"),
    "lru+prefetch": dict(expert_eviction="lru", expert_prefetch="pregate"),
    "correlation+prefetch": dict(expert_eviction="correlation", expert_prefetch="pregate"),
}


def build_random_moe(folder: Path, hidden: int, experts: int, inter: int, layers: int) -> Path:
    """A random Qwen3-MoE-shaped checkpoint (bfloat16), with a tiny trained tokenizer."""
    if (folder / "config.json").exists():
        return folder
    import torch
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    sys.path.insert(0, str(ROOT.parent))
    from tests.checkpoints import make_tokenizer, tokenizer_vocab_size

    cfg = Qwen3MoeConfig(vocab_size=tokenizer_vocab_size("bytelevel"), hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=max(hidden // 64, 1), num_key_value_heads=max(hidden // 256, 1),
                         head_dim=64, intermediate_size=4 * hidden, moe_intermediate_size=inter,
                         num_experts=experts, num_experts_per_tok=min(4, experts), norm_topk_prob=True,
                         max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0, 0.02) if "norm" in name else p.normal_(0.0, 0.5 if "gate.weight" in name else 0.05)
    model.to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
    make_tokenizer(folder, "bytelevel")
    return folder


def decode_run(model: str, batch: int, new_tokens: int, **options) -> dict:
    """Decode tok/s over `batch` prompts (prefill excluded), and the expert counters of the decode part."""
    from ferry import LLM, SamplingParams

    with LLM(model, dtype="bfloat16", kv_cache_memory="64M", **options) as llm:
        prompts = [{"prompt_token_ids": [1] + [(17 * i + 5 * j) % 300 + 3 for j in range(15)]} for i in range(batch)]
        first = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
        llm.generate(prompts, first, use_tqdm=False)  # warm-up: prefill, kernels, caches
        before = llm.engine.stats()
        t0 = time.perf_counter()
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True),
                            use_tqdm=False)
        seconds = time.perf_counter() - t0
        after = llm.engine.stats()
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    rec = {"batch": batch, "tokens": tokens, "seconds": seconds, "tok_per_s": tokens / seconds,
           "token_ids": [o.outputs[0].token_ids for o in outs]}
    e0, e1 = before.experts, after.experts
    if e1 is not None:
        d = {k: getattr(e1, k) - getattr(e0, k) for k in ("lookups", "hits", "bytes_read", "stall_seconds",
                                                           "num_predicted", "num_predicted_used", "num_needed")}
        rec.update(hit_rate=d["hits"] / max(d["lookups"], 1),
                   prefetch_precision=d["num_predicted_used"] / d["num_predicted"] if d["num_predicted"] else None,
                   prefetch_recall=d["num_predicted_used"] / d["num_needed"] if d["num_needed"] else None,
                   bytes_read_per_token=d["bytes_read"] / tokens, stall_ms_per_token=1e3 * d["stall_seconds"] / tokens,
                   cache_nbytes=e1.cache_nbytes, io_mode=e1.io_mode)
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="MoE checkpoint folder (default: a random Qwen3-MoE-shaped one)")
    ap.add_argument("--work", default=str(ROOT / ".cache" / "moe_offload"), help="where models and stores go")
    ap.add_argument("--budgets", default="1,0.5,0.25,0.125", help="fractions of all experts' bytes")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny model and few tokens: checks the script runs")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        args.new_tokens, args.batches = 4, "1,4"
    model = Path(args.model) if args.model else build_random_moe(
        work / ("smoke-moe" if args.smoke else "random-qwen3-moe"), *((128, 8, 64, 2) if args.smoke else (1024, 64, 512, 8)))

    import torch
    from ferry.experts.convert import convert_expert_store
    from ferry.experts.layout import StoreIndex

    if args.threads:
        torch.set_num_threads(args.threads)
    store = work / (model.name + ".experts")
    if not (store / "index.json").exists():
        convert_expert_store(model, store, "bfloat16")
    index = StoreIndex.load(store)
    total = index.total_nbytes
    records = []
    for batch in [int(b) for b in args.batches.split(",")]:
        base = decode_run(str(model), batch, args.new_tokens)
        records.append({"mode": "all-in-memory", "budget": 1.0, **base})
        print(f"batch {batch:3d} all-in-memory: {base['tok_per_s']:.1f} tok/s", flush=True)
        for frac in [float(f) for f in args.budgets.split(",")]:
            for mode, options in MODES.items():
                r = decode_run(str(model), batch, args.new_tokens, expert_store=str(store),
                               expert_cache_memory=max(int(total * frac), index.slot_nbytes), **options)
                r.update(mode=mode, budget=frac, relative=r["tok_per_s"] / base["tok_per_s"],
                         token_exact=r["token_ids"] == base["token_ids"])
                records.append(r)
                print(f"batch {batch:3d} budget {frac:5.3f} {mode:22s} {r['tok_per_s']:8.1f} tok/s "
                      f"({r['relative']:.2f}x) hit {r['hit_rate']:.2f} precision {r['prefetch_precision']} "
                      f"recall {r['prefetch_recall']} {r['bytes_read_per_token'] / 2**20:.2f} MiB/token "
                      f"stall {r['stall_ms_per_token']:.2f} ms/token exact={r['token_exact']}", flush=True)
    for r in records:
        r.pop("token_ids")
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    out = (ROOT / ".cache" / "smoke" if args.smoke else ROOT / "results") / "moe_offload.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"scenario": "moe-offload", "model": str(model), "expert_bytes": total,
                               "new_tokens": args.new_tokens, "git": sha, "machine": {
                                   "python": platform.python_version(), "torch": torch.__version__,
                                   "cores": os.cpu_count(), "load_average": os.getloadavg()},
                               "records": records}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
