"""The I/O-compute planner: its choices follow the measured costs and the budget, and --explain shows them."""
from __future__ import annotations

import torch

from ferry import LLM, SamplingParams
from ferry.config import ModelConfig
from ferry.experts.planner import Costs, make_plan, measure_costs
from ferry.experts.policies import LRUPolicy
from ferry.experts.store import ExpertStore
from tests.expert_stores import make_store

MIB = 1 << 20


def test_fast_disk_plan_is_compute_bound_and_prefetches_what_it_can_read():
    costs = Costs(bandwidth=2e9, expert_nbytes=MIB, expert_overhead_s=1e-3, token_s=1e-4)
    plan = make_plan(costs, num_experts=64, top_k=4, num_layers=16, num_slots=256, max_num_seqs=16)
    row = next(r for r in plan.rows if r["batch"] == plan.batch)
    assert row["compute_ms"] >= row["io_ms"] and row["tok_s"] >= 0.9 * max(r["tok_s"] for r in plan.rows)
    assert all(r["batch"] <= 16 for r in plan.rows)
    readable = int(row["compute_ms"] / 1e3 * 2e9 / MIB)
    assert plan.prefetch_width == min(64, 256, max(readable, 4))
    assert plan.prefetch_depth == (2 if readable >= 2 * plan.prefetch_width else 1)
    assert make_plan(Costs(1e12, MIB, 1e-3, 1e-4), 64, 4, 16, 256, 16).prefetch_depth == 2  # reads are free
    assert "<- plan" in plan.explain() and f"prefetch width {plan.prefetch_width}" in plan.explain()


def test_slow_disk_plan_says_it_is_io_bound_and_keeps_prefetch_to_a_tokens_worth():
    costs = Costs(bandwidth=1e8, expert_nbytes=8 * MIB, expert_overhead_s=1e-4, token_s=1e-5)
    plan = make_plan(costs, num_experts=8, top_k=2, num_layers=4, num_slots=3, max_num_seqs=4)
    assert plan.prefetch_width == 2 and plan.prefetch_depth == 1
    assert any("I/O-bound" in n for n in plan.notes) and any("fewer than one layer needs" in n for n in plan.notes)
    everything = make_plan(costs, num_experts=8, top_k=2, num_layers=4, num_slots=32, max_num_seqs=4)
    assert all(r["reads"] == 0 for r in everything.rows) and any("fits in the cache" in n for n in everything.notes)
    assert everything.prefetch_width == 0  # nothing is ever evicted: no prediction needed


def test_measured_costs_leave_nothing_behind(tmp_ckpt_dir):
    ckpt, folder = make_store("mixtral", tmp_ckpt_dir)
    shape = ([0, 1], 8, 2)
    store = ExpertStore(folder, ModelConfig.from_hf(ckpt), torch.float32, None, LRUPolicy(*shape))
    try:
        costs = measure_costs(store)
        assert costs.bandwidth > 0 and costs.expert_overhead_s > 0 and costs.expert_nbytes == store.index.slot_nbytes
        s = store.stats()
        assert store.cache.all_free and (s.lookups, s.bytes_read, s.num_reads) == (0, 0, 0)
    finally:
        store.close()


def test_explain_prints_the_plan_and_applies_its_prefetch_width(tmp_ckpt_dir, capsys):
    ckpt, folder = make_store("mixtral", tmp_ckpt_dir)
    with LLM(str(ckpt), dtype="float32", kv_cache_memory="4M", expert_store=str(folder), expert_prefetch="pregate",
             expert_cache_memory="200K", explain=True, max_num_seqs=4) as llm:
        assert "expert plan: disk" in capsys.readouterr().err
        width = llm.engine.parts.experts.prefetcher.width
        assert 2 <= width <= 8
        llm.generate([[1, 5, 9]], SamplingParams(max_tokens=3), use_tqdm=False)
        s = llm.engine.stats().experts
        assert s.lookups > 0 and s.num_predicted <= width * 3
