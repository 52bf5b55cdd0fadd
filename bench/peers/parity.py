"""Do ferry and llama.cpp compute the same thing? Checked before any timing: a faster wrong answer never counts.

- offline_check: ferry's `LLM` at float32 against llama.cpp (libllama, float32 GGUF, float32 KV cache, no flash
  attention) on the same token-id prompts, greedy, no end-of-sequence stop. Float32 on both sides with the
  same weights must give the same tokens, and the same top-5 log-probabilities at every step up to float32
  rounding (max_logprob_diff). Greedy tokens alone are a weak test on random weights, whose outputs are
  dominated by echoing the input: a qwen2 GGUF with wrongly permuted q/k still matches ferry's greedy tokens
  on the tiny smoke model, while its logprobs are off by orders of magnitude more than rounding.
- agreement: the fraction of positions where two greedy token lists agree, counted up to the first
  divergence in each pair (after it, the contexts differ and so may everything else).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

LOGPROB_TOL = 1e-3   # float32 vs float32, different summation orders: ~1e-6 seen; a q/k layout error: ~1e-2


def check_prompts(vocab_size: int, num_prompts: int = 4, seed: int = 1) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab_size) for _ in range(rng.randint(8, 64))] for _ in range(num_prompts)]


def agreement(want: list[list[int]], got: list[list[int]]) -> dict:
    """Positions matching before the first divergence over all positions, and each pair's divergence index."""
    total = sum(len(w) for w in want)
    first = [next((i for i, (a, b) in enumerate(zip(w, g)) if a != b), min(len(w), len(g)))
             for w, g in zip(want, got)]
    exact = len(want) == len(got) and all(w == g for w, g in zip(want, got))
    return {"agreement": sum(first) / max(total, 1), "exact": exact, "first_divergence": first}


def logprob_diff(a: list[list[list[tuple[int, float]]]], b: list[list[list[tuple[int, float]]]],
                 first: list[int]) -> float:
    """Largest |logprob difference| over token ids in both top-k lists, at steps before the first divergence."""
    worst = 0.0
    for pa, pb, n in zip(a, b, first):
        for ta, tb in zip(pa[:n], pb[:n]):
            da = dict(ta)
            worst = max([worst] + [abs(da[t] - v) for t, v in tb if t in da])
    return worst


def ferry_greedy(model_dir: str | Path, prompts: list[list[int]], max_tokens: int, dtype: str, threads: int,
                 logprobs: int = 5) -> tuple[list[list[int]], list]:
    from ferry import LLM, SamplingParams
    llm = LLM(str(model_dir), dtype=dtype, threads=threads, kv_cache_memory="256M")
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=logprobs)
    outs = [o.outputs[0] for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)]
    return [list(o.token_ids) for o in outs], [[list(lp.top) for lp in o.logprobs] for o in outs]


def offline_check(model_dir: str | Path, gguf_f32: str | Path, threads: int, num_prompts: int = 4,
                  max_tokens: int = 16) -> dict:
    """ferry vs llama.cpp at float32; "ok" when the tokens are equal and the logprobs within LOGPROB_TOL."""
    from bench.peers.llamacpp import run
    vocab = json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"]
    prompts = check_prompts(vocab, num_prompts)
    want, want_lp = ferry_greedy(model_dir, prompts, max_tokens, "float32", threads)
    r = run("greedy", model=str(gguf_f32), threads=threads, prompts=prompts, max_tokens=max_tokens,
            kv_type="f32", flash_attn="off", logprobs=5)
    res = agreement(want, r["token_ids"])
    res["max_logprob_diff"] = logprob_diff(want_lp, r["logprobs"], res["first_divergence"])
    res["ok"] = res["exact"] and res["max_logprob_diff"] <= LOGPROB_TOL
    return {**res, "prompts": len(prompts), "max_tokens": max_tokens, "ferry": want, "llama.cpp": r["token_ids"]}
