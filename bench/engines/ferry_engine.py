"""ferry's engine in a worker process (bench/engines/worker.py): `ferry.LLM`, greedy, token-id prompts."""
from __future__ import annotations

import sys
import time
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.engines.worker import Engine, serve


class FerryEngine(Engine):
    """options: model, dtype, threads, and any ferry.LLM keyword (kv_cache_memory, max_num_seqs, ...)."""

    def __init__(self, model: str, dtype: str, threads: int, **options) -> None:
        from ferry import LLM
        self.llm = LLM(model, dtype=dtype, threads=threads, **options)

    def generate(self, prompts: list[list[int]], max_tokens: list[int]) -> dict:
        from ferry import SamplingParams
        params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in max_tokens]
        t = time.perf_counter()
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        seconds = time.perf_counter() - t
        n = sum(len(o.outputs[0].token_ids) for o in outs)
        return {"seconds": seconds, "output_tokens": n, "tok_s": n / seconds}

    def greedy(self, prompts: list[list[int]], max_tokens: int, logprobs: int = 5) -> dict:
        from ferry import SamplingParams
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=logprobs)
        ids, lps = [], []
        for p in prompts:  # one at a time, as the other engines do here
            o = self.llm.generate([{"prompt_token_ids": p}], params, use_tqdm=False)[0].outputs[0]
            ids.append(list(o.token_ids))
            lps.append([list(lp.top) for lp in o.logprobs])
        return {"token_ids": ids, "logprobs": lps}


if __name__ == "__main__":
    serve(FerryEngine)
