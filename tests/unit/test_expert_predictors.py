"""Expert predictors: correlation statistics learned online (and saved), pre-gating with the next router,
and the store's precision / recall counters."""
from __future__ import annotations

import pytest
import torch

from ferry.config import ModelConfig
from ferry.errors import InvalidRequest
from ferry.experts.policies import LRUPolicy
from ferry.experts.predictors import CorrelationPredictor, ExpertPredictor, PreGatePredictor
from ferry.experts.store import ExpertStore
from tests.expert_stores import check_store_clean, make_store


def _teach(p: CorrelationPredictor, num_tokens: int = 20) -> None:
    """Layer 0 routes token t to experts {t%8, (t+1)%8}; layer 1 to {(t+3)%8, (t+4)%8}."""
    t = torch.arange(num_tokens)
    p.observe(0, torch.zeros(num_tokens, 4), torch.stack([t % 8, (t + 1) % 8], 1))
    p.observe(1, torch.zeros(num_tokens, 4), torch.stack([(t + 3) % 8, (t + 4) % 8], 1))


def test_correlation_learns_coactivation_online():
    p = CorrelationPredictor([0, 1], num_experts=8, top_k=2)
    x = torch.zeros(1, 4)
    assert p.predict(0, x, torch.tensor([[2, 3]])) == {}  # nothing learned: no guess
    _teach(p)
    guess = p.predict(0, x, torch.tensor([[2, 3]]))  # token 2 -> layer 1 experts 5 and 6
    assert sorted(guess, key=guess.get, reverse=True)[:2] == [5, 6]
    assert p.predict(1, x, torch.tensor([[5, 6]])) == {}  # the last MoE layer: next is another forward


def test_correlation_statistics_save_and_load(tmp_path):
    p = CorrelationPredictor([0, 1], num_experts=8, top_k=2)
    _teach(p)
    p.save(tmp_path / "corr.json")
    q = CorrelationPredictor([0, 1], num_experts=8, top_k=2)
    q.load(tmp_path / "corr.json")
    assert all(torch.equal(p.counts[l], q.counts[l]) for l in (0, 1))
    with pytest.raises(InvalidRequest, match="another model"):
        CorrelationPredictor([0, 1, 2], num_experts=8, top_k=2).load(tmp_path / "corr.json")
    (tmp_path / "bad.json").write_text("[]")
    with pytest.raises(InvalidRequest, match="not a saved correlation table"):
        q.load(tmp_path / "bad.json")


def test_pregate_applies_the_next_router_to_this_input():
    torch.manual_seed(0)
    router = torch.randn(8, 16)
    p = PreGatePredictor([0, 1], num_experts=8, top_k=2)
    p.set_routers({0: torch.randn(8, 16), 1: router})
    x = torch.randn(3, 16)
    want = set(torch.topk(x @ router.T, 2, dim=-1).indices.flatten().tolist())
    assert set(p.predict(0, x, torch.zeros(3, 2, dtype=torch.long))) == want


class _Oracle(ExpertPredictor):
    """Predicts a fixed set for layer 1: the counters must score it against what layer 1 uses."""

    def predict(self, layer, x, top_ids):
        return {1: 0.9, 2: 0.8, 3: 0.7} if layer == 0 else {}


def test_store_counts_prefetch_precision_and_recall(tmp_ckpt_dir):
    ckpt, folder = make_store("mixtral", tmp_ckpt_dir)
    cfg = ModelConfig.from_hf(ckpt)
    shape = ([0, 1], 8, 2)
    store = ExpertStore(folder, cfg, torch.float32, None, LRUPolicy(*shape), _Oracle(*shape))
    try:
        x = torch.zeros(1, cfg.hidden_size)
        for layer, used in [(0, [0, 4]), (1, [2, 3, 5, 6])]:
            for _ in store.weights(layer, used, x, torch.tensor([used[:2]])):
                pass
        s = store.stats()
        assert (s.num_predicted, s.num_predicted_used, s.num_needed) == (3, 2, 4)
        assert s.prefetch_precision == pytest.approx(2 / 3) and s.prefetch_recall == pytest.approx(0.5)
        assert s.num_prefetches == 3 and s.num_prefetches_used == 2 and s.hits == 2
        check_store_clean(store, s.budget_nbytes)
    finally:
        store.close()


def test_engine_keeps_correlation_statistics_between_runs(tmp_ckpt_dir, tmp_path):
    from ferry import LLM, SamplingParams

    ckpt, folder = make_store("mixtral", tmp_ckpt_dir)
    path = tmp_path / "corr.json"
    options = dict(dtype="float32", kv_cache_memory="4M", expert_store=str(folder), expert_prefetch="correlation",
                   expert_correlation_file=str(path))
    with LLM(str(ckpt), **options) as llm:
        llm.generate([[1, 5, 9, 13, 20]], SamplingParams(max_tokens=4), use_tqdm=False)
        learned = {l: c.clone() for l, c in llm.engine.parts.experts.predictor.counts.items()}
    assert path.exists() and learned[0].sum() > 0
    with LLM(str(ckpt), **options) as llm:  # starts from what the first run learned
        assert torch.equal(llm.engine.parts.experts.predictor.counts[0], learned[0])
    with pytest.raises(InvalidRequest, match="needs expert_prefetch=correlation"):
        LLM(str(ckpt), **{**options, "expert_prefetch": "pregate"})


def test_pregate_looks_several_layers_ahead_within_the_forward():
    torch.manual_seed(1)
    p = PreGatePredictor([0, 1, 3], num_experts=8, top_k=2)  # layer 2 is dense
    routers = {l: torch.randn(8, 16) for l in (0, 1, 3)}
    p.set_routers(routers)
    x = torch.randn(2, 16)
    ahead = p.predict_ahead(0, x, torch.zeros(2, 2, dtype=torch.long), depth=2)
    assert list(ahead) == [1, 3]
    assert set(ahead[3]) == set(torch.topk(x @ routers[3].T, 2, dim=-1).indices.flatten().tolist())
    assert list(p.predict_ahead(1, x, torch.zeros(2, 2, dtype=torch.long), depth=2)) == [3]
    assert p.predict_ahead(3, x, torch.zeros(2, 2, dtype=torch.long), depth=2) == {}
