"""Exploratory probe, not a scenario: does an int4 expert store get the random MoE of bench/moe_offload.py to
all-in-memory speed at the RAM of its 25% bf16 budget (where all int4 experts nearly fit)? Batch 16, ferry only,
no cgroup (ferry's cache budget holds by construction), two interleaved rounds against all-in-memory bf16.
Lossy: the greedy tokens are compared, not required to match.

    .venv/bin/python bench/moe_int4_probe.py      # after `python -m bench moe-offload` built the model
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.moe_offload import RANDOM_NAME, WORK, prompts_random  # noqa: E402
from ferry import LLM, SamplingParams  # noqa: E402
from ferry.experts.convert import convert_expert_store  # noqa: E402
from ferry.experts.layout import StoreIndex  # noqa: E402

MODEL = str(Path(__file__).resolve().parent / ".cache" / f"{RANDOM_NAME}-bf16")
BF16_STORE = WORK / f"{RANDOM_NAME}-bf16-bfloat16.experts"
INT4_STORE = WORK / f"{RANDOM_NAME}-bf16-int4.experts"


def rate(llm: LLM, prompts: list[dict], new_tokens: int = 24) -> tuple[float, list]:
    """Decode tok/s as in moe_offload.measure: (N-token run - 1-token run on the reversed prompts)."""
    rev = [{"prompt_token_ids": p["prompt_token_ids"][::-1]} for p in prompts]
    t = time.perf_counter()
    llm.generate(rev, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True), use_tqdm=False)
    one = time.perf_counter() - t
    t = time.perf_counter()
    out = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True), use_tqdm=False)
    full = time.perf_counter() - t
    return len(prompts) * (new_tokens - 1) / (full - one), [o.outputs[0].token_ids for o in out]


def main() -> None:
    if not (INT4_STORE / "index.json").exists():
        convert_expert_store(MODEL, INT4_STORE, "bfloat16", bits="4")
    budget = int(0.25 * StoreIndex.load(BF16_STORE).total_nbytes)
    print(f"int4 store {StoreIndex.load(INT4_STORE).total_nbytes >> 20} MiB; budget {budget >> 20} MiB")
    prompts = [{"prompt_token_ids": p} for p in prompts_random(32000, 16, 0)]
    common = dict(dtype="bfloat16", threads=2, kv_cache_memory="64M", max_num_seqs=16)
    mem = LLM(MODEL, **common)
    q = LLM(MODEL, expert_store=str(INT4_STORE), expert_cache_memory=budget, expert_eviction="correlation",
            expert_prefetch="pregate", **common)
    for llm in (mem, q):  # warm-up
        llm.generate(prompts, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True), use_tqdm=False)
    for r in range(2):
        a, ids_a = rate(mem, prompts)
        b, ids_b = rate(q, prompts)
        same = sum(x == y for x, y in zip(ids_a, ids_b))
        print(f"round {r}: in-memory bf16 {a:.1f} tok/s, int4 store at the 25% bf16 budget {b:.1f} tok/s "
              f"({b / a:.2f}x); {same}/16 sequences with the same greedy tokens; expert hit rate "
              f"{q.engine.stats().experts.hit_rate:.2f}")


if __name__ == "__main__":
    main()
