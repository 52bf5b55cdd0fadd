"""Tiny MoE checkpoints with their expert stores, built once per test session, a MoE layer's calls on a store
without a model (serve_layer), and the checks every run with a store ends with (budget held, nothing pinned,
every slot back after emptying)."""
from __future__ import annotations

import pathlib
from typing import Iterator, Sequence

import torch

from ferry.config import ModelConfig
from ferry.eval.activations import record_expert_inputs
from ferry.eval.suite import HELDOUT
from ferry.experts.allocate import BitPlan
from ferry.experts.bitwidth import Format, format_nbytes
from ferry.experts.convert import convert_expert_store, plan_expert_bits
from ferry.experts.layout import ExpertLayout
from ferry.experts.store import ExpertStore
from tests.checkpoints import make_checkpoint

_BUILT: dict[tuple[str, str, str], tuple[pathlib.Path, pathlib.Path]] = {}


def make_store(family: str, root: pathlib.Path, dtype: str = "float32",
               bits: str = "none") -> tuple[pathlib.Path, pathlib.Path]:
    """(checkpoint folder, expert store folder) of a tiny random MoE checkpoint; bits as `ferry convert
    --expert-bits` (auto: formats chosen on recorded inputs to fit 3/4 of the way from all-int4 to all-int8)."""
    key = (family, dtype, bits)
    if key not in _BUILT:
        ckpt = make_checkpoint(family, root)
        store = root / f"{family}-{dtype}{'' if bits == 'none' else '-int' + bits}.experts"
        convert_expert_store(ckpt, store, dtype, bits, auto_plan(ckpt, dtype) if bits == "auto" else None)
        _BUILT[key] = (ckpt, store)
    return _BUILT[key]


def auto_plan(ckpt: pathlib.Path, dtype: str, fraction: float = 0.75) -> BitPlan:
    """`--expert-bits auto` for a tiny checkpoint: inputs recorded on 256 tokens of the held-out text, the size
    `fraction` of the way from every expert at int4 to every expert at int8 (a mix of both)."""
    cfg = ModelConfig.from_hf(str(ckpt))
    layout = ExpertLayout.for_shape(dtype, cfg.hidden_size, cfg.moe.intermediate_size, 32)
    n = cfg.moe.num_experts * sum(cfg.moe.sparse_layers)
    low, high = (n * format_nbytes(layout, Format(b, 32)) for b in (4, 8))
    calibration = record_expert_inputs(str(ckpt), HELDOUT, num_tokens=256, max_rows=32)
    return plan_expert_bits(ckpt, calibration, int(low + fraction * (high - low)), dtype)


def serve_layer(store: ExpertStore, layer: int, experts: Sequence[int], x: torch.Tensor,
                top_ids: torch.Tensor) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """What a MoE layer does with a store (ferry.models.layers.mlp.MoE.forward): ask for its experts (demand
    reads start), tell its routing observers (here: the store's prefetcher, if any) the routing x [T, D] ->
    top_ids [T, A], then compute with each expert handed out (iterate the result to the end). experts: the
    distinct experts of top_ids, in the order the layer asks for them."""
    assert set(experts) == set(top_ids.flatten().tolist()), "a layer asks for the experts it routed to"
    pairs = store.weights(layer, experts)
    if store.prefetcher is not None:
        store.prefetcher.routed(layer, x, top_ids, torch.ones(top_ids.shape, dtype=x.dtype))
    return pairs


def check_store_clean(store: ExpertStore, budget: int) -> None:
    """After a run: the budget held, no expert pinned, and emptying the cache gives every slot back."""
    stats = store.stats()
    assert store.cache.nbytes <= budget and stats.cache_nbytes <= budget
    assert stats.max_slots_used <= store.cache.num_slots
    assert all(e.pins == 0 for e in store.cache.entries.values()), "an expert stayed pinned"
    store.empty()
    assert store.cache.all_free, "expert slots leaked"
