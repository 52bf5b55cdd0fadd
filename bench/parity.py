"""Do the engines compute the same thing? Checked before any timing: a faster wrong answer never counts.

- check: every engine at float32 (each in its own worker, one after the other) on the same token-id prompts,
  greedy, no end-of-sequence stop, against ferry: transformers on the same safetensors, llama.cpp on the float32
  GGUF with a float32 KV cache and no flash attention. Float32 on both sides with the
  same weights must give the same tokens, and the same top-5 log-probabilities at every step up to float32
  rounding (max_logprob_diff). Greedy tokens alone are a weak test on random weights, whose outputs are
  dominated by echoing the input: a qwen2 GGUF with wrongly permuted q/k still matches ferry's greedy tokens
  on the tiny smoke model, while its logprobs are off by orders of magnitude more than rounding.
- smoke (`.venv/bin/python -m bench.parity --smoke`): the tiny llama, qwen2 and olmoe converted to GGUF at every
  outtype, then llama.cpp's float32 greedy tokens and logprobs against ferry's.
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


def check(model_dir: str | Path, engines: list[str], threads: int, num_prompts: int = 4,
          max_tokens: int = 16) -> dict:
    """Each engine's float32 greedy tokens and top-5 logprobs against ferry's. "ok" when every peer gives the
    same tokens with logprobs within LOGPROB_TOL; an engine that cannot run the model is listed, not failed."""
    from bench.engines import Unavailable, start
    vocab = json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"]
    prompts = check_prompts(vocab, num_prompts)
    outs, out = {}, {"prompts": len(prompts), "max_tokens": max_tokens, "engines": {}, "unavailable": {}}
    for name in ["ferry", *[e for e in engines if e != "ferry"]]:
        try:
            with start(name, model_dir, "float32", threads, **_check_options(name)) as w:
                outs[name] = w.call("greedy", prompts=prompts, max_tokens=max_tokens, logprobs=5)
        except Unavailable as e:
            out["unavailable"][name] = str(e)
    want = outs["ferry"]
    for name, got in outs.items():
        if name == "ferry":
            continue
        res = agreement(want["token_ids"], got["token_ids"])
        res["max_logprob_diff"] = logprob_diff(want["logprobs"], got["logprobs"], res["first_divergence"])
        res["ok"] = res["exact"] and res["max_logprob_diff"] <= LOGPROB_TOL
        out["engines"][name] = res
    out["ok"] = all(r["ok"] for r in out["engines"].values())
    return out


def _check_options(name: str) -> dict:
    if name == "ferry":
        return {"kv_cache_memory": "256M"}
    if name == "llama.cpp":
        return {"kv_type": "f32", "flash_attn": "off"}
    return {}


def describe(result: dict) -> str:
    """One line for logs and README notes."""
    parts = []
    for n, r in result["engines"].items():
        tokens = "same greedy tokens" if r["exact"] else f"greedy agreement {r['agreement']:.0%}"
        parts.append(f"{n}: {tokens}, max top-5 logprob diff {r['max_logprob_diff']:.1e}")
    parts += [f"{n}: not run ({why})" for n, why in result["unavailable"].items()]
    return "; ".join(parts)


def offline_check(model_dir: str | Path, gguf_f32: str | Path, threads: int, num_prompts: int = 4,
                  max_tokens: int = 16) -> dict:
    """ferry vs llama.cpp at float32 (bench/serving.py's check): check() reduced to the llama.cpp pair."""
    r = check(model_dir, ["llama.cpp"], threads, num_prompts, max_tokens)
    if "llama.cpp" in r["unavailable"]:
        raise RuntimeError(r["unavailable"]["llama.cpp"])
    return {**r["engines"]["llama.cpp"], "prompts": r["prompts"], "max_tokens": r["max_tokens"]}


def smoke() -> None:
    """Tiny llama, qwen2 and olmoe at every GGUF outtype, then llama.cpp's greedy tokens against ferry's (float32)."""
    from bench.models import build
    from bench.peers.gguf_export import OUTTYPES, ensure
    for shape in ("tiny-qwen2", "tiny-llama", "tiny-olmoe"):
        src = build(shape)
        for t in OUTTYPES:
            p = ensure(src, t)
            print(f"{p.name}: {p.stat().st_size / 1e6:.1f} MB")
        r = offline_check(src, ensure(src, "f32"), threads=1)
        print(f"{shape}: float32 ferry vs llama.cpp: greedy agreement {r['agreement']:.1%}, "
              f"max top-5 logprob difference {r['max_logprob_diff']:.1e} -> {'ok' if r['ok'] else 'MISMATCH'}")
        if not r["ok"]:
            raise SystemExit(f"{shape}: llama.cpp and ferry disagree: {r}")


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="convert the tiny shapes to GGUF and check llama.cpp's parity")
    if ap.parse_args().smoke:
        smoke()
    else:
        ap.error("--smoke")
