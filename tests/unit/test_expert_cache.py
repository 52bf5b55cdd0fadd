"""The RAM expert cache and its eviction policies: the budget holds under any access pattern (with prefetch
on the I/O thread), nothing stays pinned, and every slot comes back."""
from __future__ import annotations

import random

import pytest
import torch

from ferry.config import ModelConfig
from ferry.errors import InvalidRequest
from ferry.experts.cache import ExpertCache
from ferry.experts.layout import StoreIndex
from ferry.experts.policies import FrequencyCorrelationPolicy, LRUPolicy
from ferry.experts.predictors import ExpertPredictor
from ferry.experts.prefetch import Prefetcher
from ferry.experts.store import ExpertStore
from ferry.models.loader import load_model
from tests.expert_stores import check_store_clean, make_store, serve_layer


def test_lru_evicts_least_recently_used():
    p = LRUPolicy()
    for k in [(0, 1), (0, 2), (1, 3)]:
        p.on_insert(k)
    p.on_access((0, 1))
    assert p.choose_victim([(0, 1), (0, 2), (1, 3)]) == (0, 2)
    assert p.choose_victim([(0, 1), (1, 3)]) == (1, 3)
    p.on_remove((1, 3))
    assert p.choose_victim([(0, 1), (1, 3)]) == (0, 1)


def test_frequency_correlation_policy_keeps_what_is_needed_next():
    p = FrequencyCorrelationPolicy(moe_layers=[0, 1, 2], num_experts=8, top_k=2)
    for k in [(0, 1), (1, 1), (2, 1)]:
        p.on_insert(k)
        p.on_access(k)
    p.on_layer(1)  # layer 1 runs: layer 2 is next, layer 1's experts are a whole cycle away
    assert p.choose_victim([(0, 1), (1, 1), (2, 1)]) == (1, 1)
    p.on_layer(1)
    p.on_hints({(2, 1): 0.0, (2, 5): 1.0})  # the predictor says layer 2 will not use expert 1
    assert p.choose_victim([(0, 1), (2, 1)]) == (2, 1)
    for _ in range(5):  # frequently used experts of the same layer outlive rare ones
        p.on_layer(0)
        p.on_access((0, 1))
    p.on_insert((0, 7))
    assert p.choose_victim([(0, 1), (0, 7)]) == (0, 7)


@pytest.mark.parametrize("budget", [4096 * 3, 4096 * 3 + 4095, 4096 * 7])
def test_cache_slab_never_exceeds_the_budget(budget):
    cache = ExpertCache(budget, 4096, LRUPolicy())
    assert cache.nbytes <= budget and cache.slab.data_ptr() % 4096 == 0
    entries = [cache.reserve((0, e), set(), False) for e in range(cache.num_slots)]
    assert cache.reserve((1, 0), set(), False) is None  # all loading: nothing to evict
    for e in entries:
        e.done = True
    entries[0].pins = 1
    assert cache.reserve((1, 0), {(0, 1)}, False).slot == entries[2].slot  # not pinned, not protected
    entries[0].pins = 0
    for e in cache.entries.values():
        e.done = True
    cache.clear()
    assert cache.all_free


class _RandomPredictor(ExpertPredictor):
    """Guesses random experts for the next layer: prefetches that compete with demand reads."""

    def predict(self, layer, x, top_ids):
        return {e: random.random() for e in random.sample(range(self.num_experts), 3)}


@pytest.mark.parametrize("policy", [LRUPolicy, FrequencyCorrelationPolicy])
@pytest.mark.parametrize("num_slots", [1, 3, 9])
def test_budget_holds_and_nothing_leaks_under_random_routing(tmp_ckpt_dir, policy, num_slots):
    random.seed(num_slots)
    ckpt, folder = make_store("qwen3_moe", tmp_ckpt_dir)
    cfg = ModelConfig.from_hf(ckpt)
    shape = ([0, 1], cfg.moe.num_experts, cfg.moe.top_k)
    resident = load_model(cfg, torch.float32, torch.device("cpu"), 64)
    want = {(l, e): (resident.layers[l].mlp.experts.gate_up[e], resident.layers[l].mlp.experts.down[e])
            for l in (0, 1) for e in range(8)}
    record = StoreIndex.load(folder).layout.record_nbytes
    store = ExpertStore(folder, cfg, torch.float32, num_slots * record + 100, policy(*shape))
    Prefetcher(store, _RandomPredictor(*shape))
    try:
        for step in range(60):
            layer = step % 2
            experts = sorted(random.sample(range(8), random.randint(1, 8)))
            x, top_ids = torch.randn(len(experts), cfg.hidden_size), torch.tensor(experts).view(-1, 1)
            for i, g, d in serve_layer(store, layer, experts, x, top_ids):
                e = experts[i]
                assert store.cache.num_used <= num_slots
                assert torch.equal(g, want[(layer, e)][0]) and torch.equal(d, want[(layer, e)][1])
            if step == 30:  # a forward that stops early (an exception in the layer) must not keep a pin
                gen = serve_layer(store, layer, experts, x, top_ids)
                next(gen)
                gen.close()
        s = store.stats()
        assert s.num_prefetches > 0 and s.max_slots_used <= num_slots
        check_store_clean(store, num_slots * record + 100)
    finally:
        store.close()
    assert store.cache.slab is None



def _hit_rate(folder, cfg, policy, num_slots: int, pattern: list[tuple[int, list[int]]]) -> float:
    shape = ([0, 1], 8, 2)
    store = ExpertStore(folder, cfg, torch.float32, num_slots * StoreIndex.load(folder).layout.record_nbytes,
                        policy(*shape))
    try:
        for layer, experts in pattern:
            for _ in store.weights(layer, experts):
                pass
        return store.stats().hit_rate
    finally:
        store.close()


def test_frequency_correlation_policy_beats_lru_on_hot_experts(tmp_ckpt_dir):
    """Both layers use experts 1 and 4 every forward; layer 0 adds a rare one. LRU lets the rare ones push out
    hot experts; counting uses (and evicting the layer just computed first) keeps the hot ones."""
    ckpt, folder = make_store("mixtral", tmp_ckpt_dir)
    rng = random.Random(0)
    pattern = [(l, sorted({1, 4} | ({rng.choice([0, 2, 3, 5, 6, 7])} if l == 0 else set())))
               for _ in range(40) for l in (0, 1)]
    cfg = ModelConfig.from_hf(ckpt)
    lru, fc = (_hit_rate(folder, cfg, p, 4, pattern) for p in (LRUPolicy, FrequencyCorrelationPolicy))
    assert fc >= lru + 0.1, (lru, fc)


def test_prefetch_admission_weighs_the_guess_against_its_victim():
    p = FrequencyCorrelationPolicy(moe_layers=[0, 1, 2, 3], num_experts=8, top_k=2)
    for _ in range(10):
        for layer in range(4):
            p.on_layer(layer)
            p.on_access((layer, 3))  # expert 3 is used at every layer, every forward
    p.on_layer(0)
    assert not p.admit((1, 5), 0.1, (0, 3))  # an unlikely guess does not push out a hot expert
    assert p.admit((1, 5), 0.9, (0, 6))  # a likely one replaces a never-used expert
    assert LRUPolicy().admit((1, 5), 0.01, (0, 3))  # the baseline always admits
    cache = ExpertCache(4096, 4096, LRUPolicy())
    cache.reserve((0, 3), set(), False).done = True
    assert cache.reserve((1, 5), set(), False, admit=lambda victim: False) is None
    assert cache.reserve((1, 5), set(), False, only=set()) is None  # free slots only: none left
    assert cache.reserve((1, 5), set(), False, only={(0, 3)}) is not None


def test_a_layer_needing_more_experts_than_the_cache_streams_them(tmp_ckpt_dir):
    """Every forward, both layers use all 8 experts and the cache holds 6: a cyclic scan, where a cache that
    starts every missing read at once evicts everything before its next use (no hits). Reading a few ahead
    streams a layer through a few slots and keeps the others' experts for the next forward."""
    ckpt, folder = make_store("mixtral", tmp_ckpt_dir)
    pattern = [(l, list(range(8))) for _ in range(20) for l in (0, 1)]
    hit_rate = _hit_rate(folder, ModelConfig.from_hf(ckpt), FrequencyCorrelationPolicy, 6, pattern)
    assert hit_rate >= 0.15, hit_rate  # 6 - READ_AHEAD = 3 kept of the 16 a forward needs (~0.19); at once: 0


def test_a_mixed_bit_store_gets_a_class_of_slots_per_record_size():
    """Records of 4 KiB and 12 KiB (an int4 and a dense expert, say): each size gets its share of the budget as its
    own slots, an expert only ever takes (and evicts from) its own size's slots, and the slab fits the budget."""
    sizes = {(0, e): 4096 for e in range(6)} | {(1, e): 3 * 4096 for e in range(2)}  # 24 KiB + 24 KiB
    budget = 4096 * 6  # half the store: 3 small slots + 1 large one
    cache = ExpertCache(budget, sizes, LRUPolicy())
    assert sorted(cache.sizes) == [4096] * 3 + [3 * 4096] and cache.nbytes <= budget
    assert all(cache.address(i) % 4096 == 0 and cache.slot(i).numel() == cache.sizes[i] for i in range(4))
    small = [cache.reserve((0, e), set(), False) for e in range(3)]
    big = cache.reserve((1, 0), set(), False)
    assert cache.sizes[big.slot] == 3 * 4096 and {cache.sizes[e.slot] for e in small} == {4096}
    for e in small + [big]:
        e.done = True
    assert cache.reserve((1, 1), set(), False).slot == big.slot  # evicts the large expert, not a small one
    assert cache.reserve((0, 3), set(), False).slot == small[0].slot  # the least recent small one
    one = ExpertCache(3 * 4096, sizes, LRUPolicy())  # not a slot of each size: one large slot takes either
    assert one.sizes == [3 * 4096] and one.reserve((0, 0), set(), False).slot == 0
    with pytest.raises(InvalidRequest, match="holds no expert of 12288 bytes"):
        ExpertCache(2 * 4096, sizes, LRUPolicy())  # not even the largest record
