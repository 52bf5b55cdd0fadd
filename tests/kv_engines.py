"""What the KV policy tests run engines with: greedy runs under a tight block budget that end with the
allocators back to empty, and the passkey probe on ferry-tiny (which blocks the first decode query reads)."""
from __future__ import annotations

import random
from typing import Any

from ferry import LLM, SamplingParams
from ferry.default_model import ASSETS, inhouse_path
from ferry.eval.tasks import Haystack, make_sample


def run_greedy(path, prompts: list[list[int]], **kw: Any) -> tuple[list[list[int]], Any]:
    """10 greedy tokens per prompt, float32, blocks of 4, 48 tokens a step, 4 sequences at once: (token ids per
    prompt, the engine). Asserts every block (device and host) is free again and nothing is left running."""
    with LLM(str(path), dtype="float32", max_num_batched_tokens=48, max_num_seqs=4, block_size=4, **kw) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False)
        assert llm.engine.kv.all_free and not llm.engine.scheduler.has_unfinished
        return [o.outputs[0].token_ids for o in outs], llm.engine


def passkey_first_decode(seed: int = 1, length: int = 1024, depth: float = 0.5,
                         **kw: Any) -> tuple[set[int], list[list[int]], bool]:
    """ferry-tiny (float32) with KV options kw on one passkey sample: (the blocks holding the passkey's digits, in
    either of the needle's two mentions, the blocks each layer's first decode query read from the slow tier,
    whether every digit came out)."""
    with LLM(str(inhouse_path("ferry-tiny")), dtype="float32", **kw) as llm:
        enc = type("Enc", (), {"encode": lambda self, s: llm.tokenizer.encode(s, add_special_tokens=False)})()
        hay = Haystack(llm.tokenizer.encode((ASSETS / "heldout.txt").read_text()[:60000], add_special_tokens=False))
        sample = make_sample("passkey", enc, hay, random.Random(seed), length, depth)
        ids = sample.prompt_ids
        n = len(sample.answer_ids)
        digits = [i + j for i in range(len(ids)) if ids[i:i + n] == sample.answer_ids for j in range(n)]
        storage = llm.engine.parts.storage
        storage.record = []
        out = llm.generate([{"prompt_token_ids": ids}], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
        num_layers = llm.engine.parts.model_config.num_layers
        first_step = [blocks for _, blocks in storage.record[:num_layers]]  # one entry per layer
        assert llm.engine.kv.all_free
    block_size = llm.engine.config.cache.block_size
    correct = out[0].outputs[0].token_ids[:n] == sample.answer_ids
    return {i // block_size for i in digits}, first_step, correct
