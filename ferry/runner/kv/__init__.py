"""Tensor halves of the KV policies (ferry/kvcache/policies/ has the scheduler halves), by family: each registers
beside its class (base.register_policy_kv). Importing this package registers them all. Owned by the runner."""
from __future__ import annotations

from ferry.runner.kv.base import POLICY_KV, PolicyKV, build_policy_kv
from ferry.runner.kv.full import FullKV
from ferry.runner.kv.int8 import Int8KV
from ferry.runner.kv.layer_budget import LayerBudgetKV
from ferry.runner.kv.lazy import LazyKV
from ferry.runner.kv.merge import MergeKV
from ferry.runner.kv.shadow import ShadowKV
from ferry.runner.kv.spans import SpansKV
from ferry.runner.kv.storage import BlockLayout

__all__ = ["POLICY_KV", "BlockLayout", "FullKV", "Int8KV", "LayerBudgetKV", "LazyKV", "MergeKV", "PolicyKV",
           "ShadowKV", "SpansKV", "build_policy_kv"]
