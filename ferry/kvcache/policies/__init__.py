"""KV policies by name (`--kv-policy NAME`): the scheduler-side halves, each registered beside its class (see
base.py for the interface). Importing this package registers them all."""
from __future__ import annotations

# isort: off  (the import order is the registration order: --kv-policy's choices and help read in it)
from ferry.kvcache.policies.base import KV_POLICIES, KVPolicy, KVShape, make_kv_policy
from ferry.kvcache.policies.full import FullPolicy
from ferry.kvcache.policies.int8 import Int8Policy
from ferry.kvcache.policies.spans import SpansPolicy
from ferry.kvcache.policies.shadow import ShadowPolicy
from ferry.kvcache.policies.lazy import LazyPolicy
from ferry.kvcache.policies.merge import MergePolicy
from ferry.kvcache.policies.layer_budget import LayerBudgetPolicy
# isort: on

__all__ = ["KV_POLICIES", "make_kv_policy", "FullPolicy", "Int8Policy", "KVPolicy", "KVShape", "LayerBudgetPolicy", "LazyPolicy",
           "MergePolicy", "ShadowPolicy", "SpansPolicy"]
