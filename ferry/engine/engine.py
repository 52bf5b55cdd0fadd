"""LLMEngine: requests in, RequestOutputs out, one step at a time.

    plan = scheduler.schedule(); result = runner.execute(plan); progressed = scheduler.update(plan, result)
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from ferry.config import EngineConfig, ModelConfig
from ferry.engine.output import OutputProcessor
from ferry.engine.stats import EngineStats
from ferry.errors import ContextLengthExceeded, InvalidRequest
from ferry.experts.store import ExpertStore
from ferry.kvcache.manager import KVCacheManager
from ferry.kvcache.policies import KV_POLICIES
from ferry.runner.kv import PolicyKV
from ferry.request import FinishReason, Request, RequestOutput, SamplingParams
from ferry.runner.runner import Runner
from ferry.scheduler.scheduler import Scheduler
from ferry.tokenizer import Tokenizer

log = logging.getLogger("ferry")

PromptInput = str | list[int] | dict[str, Any]


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


class LLMEngine:
    def __init__(self, parts: EngineParts) -> None:
        self.parts = parts
        self.config = parts.config
        self.model_config = parts.model_config
        self.tokenizer = parts.tokenizer
        self.scheduler = parts.scheduler
        self.runner = parts.runner
        self.kv = parts.kv
        self.max_model_len = parts.max_model_len
        self.output = OutputProcessor(parts.tokenizer)
        self.num_prompt_tokens = 0
        self.num_generation_tokens = 0
        self.num_steps = 0

    @classmethod
    def from_config(cls, config: EngineConfig) -> "LLMEngine":
        from ferry.engine.factory import build_engine_parts
        return cls(build_engine_parts(config))

    # -- requests ---------------------------------------------------------------------------------

    def encode_prompt(self, prompt: PromptInput) -> tuple[str | None, list[int]]:
        """(text, token ids) of a prompt given as text, token ids or {"prompt"| "prompt_token_ids": ...}."""
        text = None
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                text = prompt.get("prompt")  # the text, when the caller already tokenized it
                prompt = prompt["prompt_token_ids"]
            elif "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise InvalidRequest("a prompt dict needs a 'prompt' (text) or 'prompt_token_ids' (list of ints) key")
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequest("the prompt is empty; give at least one character or token")
            return prompt, self.tokenizer.encode(prompt)
        if not isinstance(prompt, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise InvalidRequest(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        vocab = self.model_config.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise InvalidRequest(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        return text if isinstance(text, str) else None, list(prompt)

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        n = len(prompt_token_ids)
        if n == 0:
            raise InvalidRequest("the prompt is empty; give at least one token")
        if n >= self.max_model_len:
            raise ContextLengthExceeded(
                f"the prompt has {n} tokens but the context holds {self.max_model_len} (prompt plus at least one "
                f"generated token); shorten the prompt, or raise --max-model-len / --kv-cache-memory if the model allows")
        if params.logprobs is not None and params.logprobs > self.model_config.vocab_size:
            raise InvalidRequest(f"logprobs={params.logprobs} exceeds the vocabulary size {self.model_config.vocab_size}")
        policy = self.kv.policy
        if params.kv_budget is not None and not (policy and policy.per_request_budget):
            takes = ", ".join(name for name, cls in KV_POLICIES.items() if cls.per_request_budget)
            raise InvalidRequest(f"kv_budget applies to servers run with --kv-policy {takes}; this one runs "
                                 f"{policy.name if policy else 'full'}: leave kv_budget out")

    def add_request(self, request_id: str, prompt: PromptInput, params: SamplingParams | None = None,
                    priority: int = 0, arrival_time: float | None = None) -> None:
        params = params or SamplingParams()
        if request_id in self.output.groups:
            raise InvalidRequest(f"request id {request_id!r} is already in use")
        text, ids = self.encode_prompt(prompt)
        self.validate(ids, params)
        now = time.monotonic() if arrival_time is None else arrival_time
        children = [Request(req_id=request_id if params.n == 1 else f"{request_id}#{i}", prompt_token_ids=ids,
                            params=params, arrival_time=now, eos_token_ids=self.parts.eos_token_ids,
                            max_model_len=self.max_model_len, priority=priority, seed_offset=i)
                    for i in range(params.n)]
        self.output.add(request_id, text, children)
        for req in children:
            self.scheduler.add(req)
        self.num_prompt_tokens += len(ids) * params.n

    def abort_request(self, request_id: str) -> RequestOutput | None:
        return self.end_request(request_id, FinishReason.ABORT)

    def end_request(self, request_id: str, reason: FinishReason, error: str | None = None) -> RequestOutput | None:
        out = None
        for child_id in self.output.children_of(request_id):
            self.scheduler.finish(child_id, reason)
            out = self.output.fail(child_id, reason, error) or out
        return out

    # -- the loop ---------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        plan = self.scheduler.schedule()
        try:
            result = self.runner.execute(plan)
        except Exception as e:  # one bad step fails its requests, not the engine
            log.exception("engine step failed; failing its %d requests", len(plan.reqs))
            outs = []
            for s in plan.reqs:
                group = self.output.child_group.get(s.req_id)
                if group is not None:
                    outs.append(self.end_request(group.request_id, FinishReason.ERROR, f"{type(e).__name__}: {e}"))
            return [o for o in outs if o is not None]
        progressed = self.scheduler.update(plan, result)
        self.num_steps += 1
        self.num_generation_tokens += len(progressed)
        outputs, stopped = self.output.process(progressed, result)
        for child_id in stopped:
            self.scheduler.finish(child_id, FinishReason.STOP)
        return outputs

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished

    def close(self) -> None:
        """Stop background work and free what the engine holds outside Python's reach (expert cache, reader threads)."""
        if self.parts.experts is not None:
            self.parts.experts.close()

    def stats(self) -> EngineStats:
        s = self.scheduler
        return EngineStats(experts=self.parts.experts.stats() if self.parts.experts else None,
            num_running=len(s.running), num_waiting=len(s.waiting),
            num_kv_blocks_total=self.kv.pool.num_blocks, num_kv_blocks_used=self.kv.pool.num_used,
            kv_cache_bytes=self.parts.storage.nbytes, kv_host_bytes=self.parts.storage.host_nbytes,
            num_kv_blocks_offloaded=self.kv.num_offloaded,
            prefix_cache_queries=s.prefix_queries, prefix_cache_hits=s.prefix_hits,
            num_preemptions=s.num_preemptions, num_prompt_tokens=self.num_prompt_tokens,
            num_generation_tokens=self.num_generation_tokens, num_steps=self.num_steps)
