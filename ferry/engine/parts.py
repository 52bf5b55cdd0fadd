"""EngineParts: the objects the factory builds and the engine wires together (its own module so that the
engine can call the factory without the factory importing the engine back)."""
from __future__ import annotations

from dataclasses import dataclass

from ferry.config import EngineConfig, ModelConfig
from ferry.experts.store import ExpertStore
from ferry.experts.tuner import OffloadTuner
from ferry.kvcache.manager import KVCacheManager
from ferry.runner.kv import PolicyKV
from ferry.runner.runner import Runner
from ferry.scheduler.scheduler import Scheduler
from ferry.speculative import Speculator
from ferry.tokenizer import Tokenizer


@dataclass
class EngineParts:
    """Everything the factory builds; the engine only wires them together."""

    config: EngineConfig
    model_config: ModelConfig
    tokenizer: Tokenizer
    kv: KVCacheManager
    storage: PolicyKV  # the KV tensors of the policy, both tiers
    scheduler: Scheduler
    runner: Runner
    max_model_len: int
    eos_token_ids: frozenset[int]
    experts: ExpertStore | None = None  # MoE experts served from disk (--expert-store)
    speculator: Speculator | None = None  # speculative decoding (--speculative-method); the scheduler drives it
    expert_tuner: OffloadTuner | None = None  # the expert store's offload setting (with it); told each step's time
