"""Tensor halves of the KV policies (ferry/kvcache/policies/ has the scheduler halves), built by name."""
from __future__ import annotations

import torch

from ferry.config import ModelConfig
from ferry.kvcache.policies import KVPolicy
from ferry.kvcache.storage import KVStorage
from ferry.models.kv.base import LayerKV, PolicyKV
from ferry.models.kv.full import FullKV
from ferry.models.kv.int8 import Int8KV
from ferry.models.kv.layer_budget import LayerBudgetKV
from ferry.models.kv.lazy import LazyKV
from ferry.models.kv.merge import MergeKV
from ferry.models.kv.shadow import ShadowKV
from ferry.models.kv.spans import SpansKV

# name -> (policy, model config, device blocks, host blocks, block size, dtype, device) -> tensors
_BUILDERS = {
    "full": lambda p, cfg, n, nh, bs, dtype, dev: FullKV(KVStorage(cfg, n, nh, bs, dtype, dev)),
    "int8": lambda p, cfg, n, nh, bs, dtype, dev: Int8KV(cfg, n, nh, bs, dev),
    "spans": lambda p, cfg, n, nh, bs, dtype, dev: SpansKV(p, cfg, n, nh, bs, dtype, dev),
    "shadow": lambda p, cfg, n, nh, bs, dtype, dev: ShadowKV(p, cfg, n, nh, bs, dtype, dev),
    "lazy": lambda p, cfg, n, nh, bs, dtype, dev: LazyKV(p, cfg, n, nh, bs, dtype, dev),
    "merge": lambda p, cfg, n, nh, bs, dtype, dev: MergeKV(p, cfg, n, nh, bs, dtype, dev),
    # layer-budget over a base storage (ferry/kvcache/policies/layer_budget.py): the base's tensors, masked reads
    **{name: lambda p, cfg, n, nh, bs, dtype, dev: LayerBudgetKV(p, _BUILDERS[p.base.name](p.base, cfg, n, nh, bs, dtype, dev),
                                                                 n, nh, bs, dev)
       for name in ("layer-budget", "layer-budget+int8", "layer-budget+merge")},
}


def build_policy_kv(policy: KVPolicy, cfg: ModelConfig, num_blocks: int, num_host_blocks: int, block_size: int,
                    dtype: torch.dtype, device: torch.device) -> PolicyKV:
    return _BUILDERS[policy.name](policy, cfg, num_blocks, num_host_blocks, block_size, dtype, device)


__all__ = ["FullKV", "Int8KV", "LayerKV", "LazyKV", "PolicyKV", "SpansKV", "build_policy_kv"]
