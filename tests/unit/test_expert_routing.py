"""The routing port (ferry.models.routing): MoE layers report their routing to observers, and nothing else
carries it. The prefetcher learns exactly the routing a layer computed through it (and only through it), the
store serves the layer from `weights(ids)` alone, and the eval recorder records routes without monkeypatching."""
from __future__ import annotations

import pytest
import torch

from ferry import LLM, SamplingParams
from ferry.config import ModelConfig
from ferry.eval.suite import recording_routes
from ferry.experts.policies import LRUPolicy
from ferry.experts.predictors import ExpertPredictor
from ferry.experts.prefetch import Prefetcher
from ferry.experts.store import ExpertStore
from ferry.models.layers.mlp import MoE
from ferry.models.loader import load_model
from ferry.models.routing import RoutingObservers
from tests.checkpoints import load_hf_model, make_checkpoint, random_prompts
from tests.expert_stores import check_store_clean, make_store


class _Watching(ExpertPredictor):
    """Keeps what it observes, and guesses experts 1, 2 and 3 for layer 1 (scored against layer 1's routing)."""

    def __init__(self, *shape) -> None:
        super().__init__(*shape)
        self.seen: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def observe(self, layer, x, top_ids):
        self.seen.append((layer, x, top_ids.clone()))

    def predict(self, layer, x, top_ids):
        return {1: 0.9, 2: 0.8, 3: 0.7} if layer == 0 else {}


class _Asked(torch.nn.Module):
    """An ExpertWeights in front of the store's: keeps the expert ids each call asks for."""

    def __init__(self, inner) -> None:
        super().__init__()
        self.inner, self.asked = inner, []

    def weights(self, expert_ids):
        self.asked.append(list(expert_ids))
        return self.inner.weights(expert_ids)


def test_prefetcher_sees_exactly_the_routing_the_layer_computed(tmp_ckpt_dir):
    ckpt, folder = make_store("mixtral", tmp_ckpt_dir)
    cfg = ModelConfig.from_hf(ckpt)
    shape = ([0, 1], 8, 2)
    resident = load_model(cfg, torch.float32, torch.device("cpu"), 64)
    store = ExpertStore(folder, cfg, torch.float32, None, LRUPolicy(*shape))
    predictor = _Watching(*shape)
    prefetcher = Prefetcher(store, predictor)
    try:
        model = load_model(cfg, torch.float32, torch.device("cpu"), 64, store.layer)
        prefetcher.bind(model)
        asked = {l: _Asked(model.layers[l].mlp.experts) for l in (0, 1)}
        for l in (0, 1):
            model.layers[l].mlp.experts = asked[l]
        torch.manual_seed(0)
        routed = {}
        for layer in (0, 1):
            x = torch.randn(5, cfg.hidden_size)
            out = model.layers[layer].mlp(x)
            # weights(ids) alone serves the layer: the same output as the resident experts, bit for bit
            assert torch.equal(out, resident.layers[layer].mlp(x))
            want_ids, _ = resident.layers[layer].mlp.route(x)
            seen_layer, seen_x, seen_ids = predictor.seen[-1]
            assert seen_layer == layer and seen_x is x and torch.equal(seen_ids, want_ids)
            routed[layer] = set(want_ids.flatten().tolist())
            assert asked[layer].asked[-1] == sorted(routed[layer])  # the store is asked for these, nothing more
        s = store.stats()
        used = routed[1]
        assert (s.num_predicted, s.num_predicted_used, s.num_needed) == (3, len({1, 2, 3} & used), len(used))
        model.routing.remove(prefetcher)  # the port is the prefetcher's only view of the routing
        model.layers[1].mlp(torch.randn(2, cfg.hidden_size))
        assert len(predictor.seen) == 2 and store.stats().num_needed == len(used)
        check_store_clean(store, s.budget_nbytes)
    finally:
        store.close()


class _Spy:
    def __init__(self, wants_stream: bool) -> None:
        self.wants_stream, self.calls = wants_stream, []

    def routed(self, layer, x, top_ids, top_w):
        self.calls.append(("routed", layer))

    def layer_done(self, layer, stream):
        self.calls.append(("done", layer, stream.clone()))


def test_observers_get_the_stream_only_when_they_ask_for_it():
    port = RoutingObservers()
    plain, streaming = _Spy(False), _Spy(True)
    port.add(plain)
    residual, out = torch.ones(2, 4), torch.full((2, 4), 2.0)
    port.layer_done(3, residual, out)
    assert plain.calls == []  # nobody wants the stream: it is not built
    port.add(streaming)
    port.routed(3, residual, torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1))
    port.layer_done(3, residual, out)
    assert plain.calls == [("routed", 3)]
    assert streaming.calls[0] == ("routed", 3) and streaming.calls[1][:2] == ("done", 3)
    assert torch.equal(streaming.calls[1][2], residual + out) and torch.equal(residual, torch.ones(2, 4))
    port.remove(plain)
    assert port.observers == [streaming]


def test_eval_recorder_records_the_routing_through_the_port(tmp_ckpt_dir):
    """The recorder is an observer on the model's port: the MoE layers are not patched, and what it records
    for a prompt is transformers' routing of that prompt (top-k of each layer's router logits)."""
    folder = make_checkpoint("mixtral", tmp_ckpt_dir)
    prompt = random_prompts(1, [12], ModelConfig.from_hf(folder).vocab_size, seed=3)[0]
    with LLM(str(folder), dtype="float32", kv_cache_memory="4M") as llm:
        model = llm.engine.parts.runner.model
        moes = [layer.mlp for layer in model.layers if isinstance(layer.mlp, MoE)]
        with recording_routes(llm) as records:
            assert all("route" not in vars(m) for m in moes) and len(model.routing.observers) == 1
            llm.generate([{"prompt_token_ids": prompt}], SamplingParams(max_tokens=1, temperature=0),
                         use_tqdm=False)
        assert model.routing.observers == []  # removed on exit
    hf = load_hf_model(folder)
    with torch.no_grad():
        logits = hf(input_ids=torch.tensor([prompt]), use_cache=False, output_router_logits=True).router_logits
    assert len(records) == len(moes) == len(logits)
    for layer, (recorded, router_logits) in enumerate(zip(records, logits)):
        assert len(recorded) == 1 and recorded[0].shape == (len(prompt), 2)  # one forward: the prompt
        want = torch.topk(router_logits.reshape(len(prompt), -1), 2, dim=-1).indices
        assert [set(r) for r in recorded[0].tolist()] == [set(w) for w in want.tolist()], f"layer {layer}"


@pytest.mark.parametrize("prefetch", ["none", "pregate"])
def test_only_a_prefetcher_watches_the_engines_routing(tmp_ckpt_dir, prefetch):
    ckpt, folder = make_store("mixtral", tmp_ckpt_dir)
    with LLM(str(ckpt), dtype="float32", kv_cache_memory="4M", expert_store=str(folder),
             expert_prefetch=prefetch) as llm:
        store = llm.engine.parts.experts
        want = [] if prefetch == "none" else [store.prefetcher]
        assert llm.engine.parts.runner.model.routing.observers == want
