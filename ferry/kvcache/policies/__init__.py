"""KV policies by name (`--kv-policy NAME`): the scheduler-side halves. See base.py for the interface."""
from __future__ import annotations

from ferry.kvcache.policies.base import KVPolicy, KVShape
from ferry.kvcache.policies.full import FullPolicy
from ferry.kvcache.policies.int8 import Int8Policy
from ferry.kvcache.policies.layer_budget import LayerBudgetPolicy, layer_budget_over
from ferry.kvcache.policies.lazy import LazyPolicy
from ferry.kvcache.policies.merge import MergePolicy
from ferry.kvcache.policies.shadow import ShadowPolicy
from ferry.kvcache.policies.spans import SpansPolicy

_POLICIES = (FullPolicy, Int8Policy, SpansPolicy, ShadowPolicy, LazyPolicy, MergePolicy,
             *(layer_budget_over(b) for b in (FullPolicy, Int8Policy, MergePolicy)))
KV_POLICIES: dict[str, type[KVPolicy]] = {p.name: p for p in _POLICIES}

__all__ = ["KV_POLICIES", "FullPolicy", "Int8Policy", "KVPolicy", "KVShape", "LayerBudgetPolicy", "LazyPolicy",
           "MergePolicy", "ShadowPolicy", "SpansPolicy"]
