"""--scheduling-policy fair through the engine: greedy tokens equal FCFS's in every preemption mode (with fairness
preemptions, and with KV preemptions from a tight cache), no KV block left held, and `user` given per prompt."""
from __future__ import annotations

import pytest

from ferry import LLM, SamplingParams
from ferry.config import ModelConfig
from ferry.errors import InvalidRequest
from ferry.kvcache.policies import KVShape
from tests.checkpoints import random_prompts

MAX_NEW = 40


def _workload(llama) -> tuple[list[list[int]], list[list[int]]]:
    vocab = ModelConfig.from_hf(llama).vocab_size
    return random_prompts(6, [5, 17, 33], vocab, seed=11), random_prompts(3, [9, 20, 3], vocab, seed=12)


def _run(llama, policy: str, mode: str, kv_blocks: int | None) -> tuple[dict[str, list[int]], object]:
    """A flood of 6 prompts from one client, then (after 8 steps) 3 from another, on 2 running slots."""
    options = {}
    if kv_blocks:
        cfg = ModelConfig.from_hf(llama)
        options["kv_cache_memory"] = kv_blocks * KVShape(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, 16,
                                                            4).plain_block_bytes  # float32
    llm = LLM(str(llama), dtype="float32", scheduling_policy=policy, preemption_mode=mode, max_num_seqs=2, **options)
    engine, params = llm.engine, SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
    flood, light = _workload(llama)
    for i, p in enumerate(flood):
        engine.add_request(f"f{i}", {"prompt_token_ids": p, "user": "flood"}, params)
    done: dict[str, list[int]] = {}
    for k in range(10_000):
        if k == 8:
            for i, p in enumerate(light):
                engine.add_request(f"l{i}", {"prompt_token_ids": p, "user": "light"}, params)
        if k > 8 and not engine.has_unfinished():
            break
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    view = engine.view()
    assert view.num_kv_blocks_used == 0 and view.num_host_blocks_used == 0, "KV blocks leaked"
    assert view.max_kv_blocks_used <= view.num_kv_blocks
    return done, engine


@pytest.mark.parametrize("kv_blocks", [None, 5], ids=["roomy", "tight"])
@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_fair_greedy_tokens_equal_fcfs(llama, mode, kv_blocks):
    want, fcfs = _run(llama, "fcfs", mode, kv_blocks)
    got, fair = _run(llama, "fair", mode, kv_blocks)
    assert got == want and len(got) == 9
    stats = fair.stats()
    assert stats.num_fair_preemptions > 0, "the light client never took a slot from the flood"
    assert fcfs.stats().num_fair_preemptions == 0 and fcfs.stats().client_token_shares is None
    if kv_blocks:
        assert stats.num_preemptions > stats.num_fair_preemptions  # KV ran out too
    shares = stats.client_token_shares
    assert set(shares) <= {"flood", "light"} and abs(sum(shares.values()) - 1) < 1e-9


def test_light_client_starts_before_the_flood_drains(llama):
    """Under FCFS the light client's first token waits for the flood's slots; under fair it comes first."""
    order = {}
    for policy in ("fcfs", "fair"):
        got, _ = _run(llama, policy, "recompute", None)
        order[policy] = list(got)  # finish order
    assert order["fcfs"].index("l0") > order["fcfs"].index("f5")
    assert order["fair"].index("l0") < order["fair"].index("f5")


def test_user_must_be_a_string(llama):
    llm = LLM(str(llama), dtype="float32", kv_cache_memory="4M", scheduling_policy="fair")
    with pytest.raises(InvalidRequest, match="'user' must be a string"):
        llm.generate([{"prompt": "hello", "user": 7}], use_tqdm=False)
    out = llm.generate([{"prompt": "hello", "user": "alice"}, "hello"], SamplingParams(max_tokens=3), use_tqdm=False)
    assert len(out) == 2 and llm.view().num_kv_blocks_used == 0
