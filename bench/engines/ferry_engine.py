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

    def generate(self, prompts: list[list[int]], max_tokens: list[int], return_ids: bool = False) -> dict:
        from ferry import SamplingParams
        params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in max_tokens]
        t = time.perf_counter()
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        seconds = time.perf_counter() - t
        n = sum(len(o.outputs[0].token_ids) for o in outs)
        ids = {"token_ids": [list(o.outputs[0].token_ids) for o in outs]} if return_ids else {}
        return {"seconds": seconds, "output_tokens": n, "tok_s": n / seconds, **ids}

    def greedy(self, prompts: list[list[int]], max_tokens: int, logprobs: int = 5) -> dict:
        from ferry import SamplingParams
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=logprobs)
        ids, lps = [], []
        for p in prompts:  # one at a time, as the other engines do here
            o = self.llm.generate([{"prompt_token_ids": p}], params, use_tqdm=False)[0].outputs[0]
            ids.append(list(o.token_ids))
            lps.append([list(lp.top) for lp in o.logprobs])
        return {"token_ids": ids, "logprobs": lps}

    def expert_stats(self) -> dict:
        """The expert store's cumulative counters (ferry/experts/stats.py); {} without --expert-store."""
        e = self.llm.engine.stats().experts
        return {} if e is None else dict(vars(e))

    def expert_plan(self, max_num_seqs: int) -> dict:
        """The planner's plan (`--explain`) for up to max_num_seqs sequences per step: it measures the disk and
        expert compute again (the probe leaves the cache empty and the counters at zero: call it first)."""
        from ferry.experts.planner import make_plan, measure_costs
        store = self.llm.engine.parts.experts
        moe, top_k = store.index, self.llm.engine.parts.model_config.moe.top_k
        plan = make_plan(measure_costs(store), moe.num_experts, top_k, len(moe.layer_files),
                         store.cache.num_slots, max_num_seqs)
        return {"batch": plan.batch, "prefetch_width": plan.prefetch_width, "prefetch_depth": plan.prefetch_depth,
                "explain": plan.explain()}


if __name__ == "__main__":
    serve(FerryEngine)
