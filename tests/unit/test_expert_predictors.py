"""Expert predictors: correlation statistics learned online (and saved), pre-gating with the next router,
and the store's precision / recall counters."""
from __future__ import annotations

import pytest
import torch

from ferry.config import ModelConfig
from ferry.errors import InvalidRequest
from ferry.experts.confidence import ConfidenceGate
from ferry.experts.policies import LRUPolicy
from ferry.experts.predictors import (
    CorrelationPredictor,
    ExpertPredictor,
    PreGatePredictor,
)
from ferry.experts.prefetch import Prefetcher
from ferry.experts.store import ExpertStore
from tests.expert_stores import check_store_clean, make_store, serve_layer


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


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    return w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def test_pregate_applies_the_next_router_to_the_normalized_stream():
    torch.manual_seed(0)
    router, norm = torch.randn(8, 16), torch.rand(16) + 0.5
    p = PreGatePredictor([0, 1], num_experts=8, top_k=2)
    p.set_routers({0: torch.randn(8, 16), 1: router}, {0: (torch.ones(16), 1e-5), 1: (norm, 1e-5)})
    stream = torch.randn(3, 16)
    want = set(torch.topk(_rms(stream, norm) @ router.T, 2, dim=-1).indices.flatten().tolist())
    assert set(p.predict_after(0, stream, 1)[1]) == want
    assert p.predict_ahead(0, stream, torch.zeros(3, 2, dtype=torch.long), 1) == {}  # it waits for the stream


class _Oracle(ExpertPredictor):
    """Predicts a fixed set for layer 1: the counters must score it against what layer 1 uses."""

    def predict(self, layer, x, top_ids):
        return {1: 0.9, 2: 0.8, 3: 0.7} if layer == 0 else {}


def test_store_counts_prefetch_precision_and_recall(tmp_ckpt_dir):
    ckpt, folder = make_store("mixtral", tmp_ckpt_dir)
    cfg = ModelConfig.from_hf(ckpt)
    shape = ([0, 1], 8, 2)
    store = ExpertStore(folder, cfg, torch.float32, None, LRUPolicy(*shape))
    Prefetcher(store, _Oracle(*shape))
    try:
        for layer, used in [(0, [0, 4]), (1, [2, 3, 5, 6])]:  # one token, then two (top-2)
            x = torch.zeros(len(used) // 2, cfg.hidden_size)
            for _ in serve_layer(store, layer, used, x, torch.tensor(used).view(-1, 2)):
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
        learned = {l: c.clone() for l, c in llm.engine.parts.experts.prefetcher.predictor.counts.items()}
    assert path.exists() and learned[0].sum() > 0
    with LLM(str(ckpt), **options) as llm:  # starts from what the first run learned
        assert torch.equal(llm.engine.parts.experts.prefetcher.predictor.counts[0], learned[0])
    with pytest.raises(InvalidRequest, match="needs expert_prefetch=correlation"):
        LLM(str(ckpt), **{**options, "expert_prefetch": "pregate"})


def test_pregate_looks_several_layers_ahead_within_the_forward():
    torch.manual_seed(1)
    p = PreGatePredictor([0, 1, 3], num_experts=8, top_k=2)  # layer 2 is dense
    routers = {l: torch.randn(8, 16) for l in (0, 1, 3)}
    p.set_routers(routers, {l: (torch.ones(16), 1e-5) for l in (0, 1, 3)})
    x = torch.randn(2, 16)
    ahead = p.predict_after(0, x, depth=2)
    assert list(ahead) == [1, 3]
    assert set(ahead[3]) == set(torch.topk(_rms(x, torch.ones(16)) @ routers[3].T, 2, dim=-1).indices.flatten().tolist())
    assert list(p.predict_after(1, x, depth=2)) == [3]
    assert p.predict_after(3, x, depth=2) == {}


def test_confidence_gate_drops_guesses_measured_mostly_wrong():
    gate = ConfidenceGate(min_precision=0.5, num_bins=10, min_samples=4)
    assert gate.keep(0.15, 1)  # nothing measured yet: tried
    for used in (False, False, False, True):
        gate.record(0.15, 1, used)
    assert not gate.keep(0.12, 1)  # same bin: 1 of 4 used
    assert gate.keep(0.12, 2) and gate.keep(0.95, 1)  # another distance, another bin: not measured yet
    for _ in range(4):
        gate.record(0.95, 1, True)
    assert gate.keep(0.95, 1)


def _no_attention_after(ckpt, root, layer: int):
    """A copy of the checkpoint whose layer `layer` has no attention output (o_proj = 0): that layer's router
    input is exactly the residual stream after the layer before, normalized."""
    import shutil

    from safetensors.torch import load_file, save_file
    out = root / f"{ckpt.name}-no-attn-{layer}"
    if not (out / "config.json").exists():
        shutil.copytree(ckpt, out, dirs_exist_ok=True)
        for f in out.glob("*.safetensors"):
            t = load_file(str(f))
            for k in t:
                if k.startswith(f"model.layers.{layer}.self_attn.o_proj"):
                    t[k] = torch.zeros_like(t[k])
            save_file(t, str(f), metadata={"format": "pt"})
    return out


def test_pregate_from_the_stream_is_exact_when_attention_adds_nothing(tmp_ckpt_dir, tmp_path):
    """The engine hands pre-gating the stream after each MoE layer (the routing port): with layer 1's attention
    adding nothing, layer 1's routing is predicted exactly, every token, so precision and recall are 100%."""
    from ferry import LLM, SamplingParams
    from ferry.experts.convert import convert_expert_store
    from ferry.experts.layout import StoreIndex

    ckpt, _ = make_store("mixtral", tmp_ckpt_dir)
    model = _no_attention_after(ckpt, tmp_path, 1)
    store = tmp_path / "store"
    convert_expert_store(model, store, "float32")
    budget = StoreIndex.load(store).total_nbytes // 2  # below 100%: the planner prefetches
    with LLM(str(model), dtype="float32", kv_cache_memory="4M", expert_store=str(store), expert_cache_memory=budget,
             expert_prefetch="pregate") as llm:
        # one token per step (a 1-token prompt): each step needs top_k experts, within the planner's width
        llm.generate([[5]], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), use_tqdm=False)
        s = llm.engine.stats().experts
        check_store_clean(llm.engine.parts.experts, budget)
    assert s.num_predicted > 0 and s.prefetch_precision == 1.0 and s.prefetch_recall == 1.0
