"""LLMEngine: requests in, RequestOutputs out, one step at a time.

    plan = scheduler.schedule(); result = runner.execute(plan); progressed = scheduler.update(plan, result)

Prompts come in through the input processor (ferry/engine/inputs.py); a request whose forward fails is found
and failed alone (ferry/engine/isolation.py); callers outside the engine read it through view()."""
from __future__ import annotations

import itertools
import logging
import time
from typing import TYPE_CHECKING

import torch

from ferry.config import EngineConfig, ModelConfig
from ferry.engine.factory import build_engine_parts
from ferry.engine.inputs import InputLimits, InputProcessor, ProcessedPrompt, PromptInput
from ferry.engine.isolation import execute_isolating
from ferry.engine.migration import Migrations
from ferry.engine.output import OutputProcessor
from ferry.engine.parts import EngineParts
from ferry.engine.resume import Resume
from ferry.engine.stats import EngineStats
from ferry.engine.view import EngineView, RequestView
from ferry.errors import InvalidRequest
from ferry.experts.stats import ExpertStats
from ferry.experts.planner import Plan, make_plan, measure_costs
from ferry.kvcache.policies import KV_POLICIES
from ferry.models.routing import RoutingObservers
from ferry.quant.model import quantized_nbytes
from ferry.request import FinishReason, Request, RequestOutput, SamplingParams

if TYPE_CHECKING:
    from ferry.speculative.base import Proposer

log = logging.getLogger("ferry")


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
        self.inputs = InputProcessor(parts.tokenizer, input_limits(parts))
        self.output = OutputProcessor(parts.tokenizer)
        self.migration = Migrations(parts, self.output)  # live migration's engine half (between steps)
        self.num_prompt_tokens = 0
        self.num_generation_tokens = 0
        self.num_steps = 0
        self.decode_weight_bytes = decode_weight_bytes(parts.runner.model, parts.model_config)
        self.decode_step_s = 0.0  # moving average of decode-only steps' forward time (/metrics: weight bytes / it)

    @classmethod
    def from_config(cls, config: EngineConfig) -> "LLMEngine":
        return cls(build_engine_parts(config))

    # -- requests ---------------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt: PromptInput, params: SamplingParams | None = None,
                    priority: int = 0, arrival_time: float | None = None) -> None:
        """Encode, validate and queue a prompt (InvalidRequest / ContextLengthExceeded when it cannot run)."""
        self.add_processed(request_id, self.inputs.process(prompt, params), priority, arrival_time)

    def add_processed(self, request_id: str, prompt: ProcessedPrompt, priority: int = 0,
                      arrival_time: float | None = None, resume: Resume | None = None) -> None:
        """Queue a prompt the input processor already accepted (AsyncLLM processes off the engine thread).
        resume: the tokens (and logprobs) the request already produced elsewhere (an instance that died, or that
        handed it over): it continues from there, with the output it would have had without the interruption."""
        if request_id in self.output.groups:
            raise InvalidRequest(f"request id {request_id!r} is already in use")
        params, ids = prompt.params, prompt.prompt_token_ids
        if resume is not None:
            resume.check(params, len(ids), self.max_model_len)
        now = time.monotonic() if arrival_time is None else arrival_time
        children = [Request(req_id=request_id if params.n == 1 else f"{request_id}#{i}", prompt_token_ids=ids,
                            params=params, arrival_time=now, eos_token_ids=self.parts.eos_token_ids,
                            max_model_len=self.max_model_len, priority=priority, user=prompt.user,
                            seed_offset=i)
                    for i in range(params.n)]
        for token in resume.output_token_ids if resume is not None else ():
            children[0].append_output(token)  # recomputed with the prompt, as after a preemption
        self.output.add(request_id, prompt.prompt, children, resume.logprobs if resume is not None else None)
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

    def fail_all(self, error: str) -> list[RequestOutput]:
        """End every unfinished request with an error (the engine itself is broken: better than a hang)."""
        outs = [self.end_request(rid, FinishReason.ERROR, error) for rid in list(self.output.groups)]
        return [o for o in outs if o is not None]

    # -- the loop ---------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        plan = self.scheduler.schedule()
        start = time.perf_counter()
        result, failed = execute_isolating(self.runner, plan)  # a request whose forward raises fails alone
        took = time.perf_counter() - start
        if self.parts.speculator is not None and plan.reqs:  # the cost model of --num-speculative-tokens auto
            decode_only = all(len(r.token_ids) == 1 + len(r.draft_token_ids) for r in plan.reqs)
            self.parts.speculator.step_done(plan.num_tokens, took, any(r.draft_token_ids for r in plan.reqs),
                                            decode_only)
        if self.parts.expert_tuner is not None and plan.reqs and not failed:  # --expert-* auto measures steps
            self.parts.expert_tuner.step_done(plan.num_tokens, len(plan.reqs), took)
        if plan.reqs and plan.num_tokens == len(plan.reqs):  # decode only: every request computes one token
            self.decode_step_s = took if not self.decode_step_s else 0.8 * self.decode_step_s + 0.2 * took
        outputs = self._fail(failed)
        progressed = self.scheduler.update(plan, result)
        self.migration.after_step(progressed)  # a prefill instance stops requests at their first token
        self.num_steps += 1
        self.num_generation_tokens += len(progressed) + sum(len(t) - 1 for t in result.spec_token_ids.values())
        processed, stopped = self.output.process(progressed, result)
        outputs += processed
        for child_id in stopped:
            self.scheduler.finish(child_id, FinishReason.STOP)
        return outputs

    def _fail(self, failed: dict[str, BaseException]) -> list[RequestOutput]:
        """End the requests (all children) whose forward raised, each with its own error."""
        outs = []
        for child_id, e in failed.items():
            group = self.output.child_group.get(child_id)
            if group is not None:
                out = self.end_request(group.request_id, FinishReason.ERROR, f"{type(e).__name__}: {e}")
                outs += [out] if out is not None else []
        return outs

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished

    def close(self) -> None:
        """Stop background work and free what the engine holds outside Python's reach (expert cache, reader threads)."""
        if self.parts.experts is not None:
            self.parts.experts.close()

    def stats(self) -> EngineStats:
        s = self.scheduler
        return EngineStats(experts=self._expert_stats(),
            num_running=len(s.running), num_waiting=len(s.waiting),
            num_kv_blocks_total=self.kv.pool.num_blocks, num_kv_blocks_used=self.kv.pool.num_used,
            kv_cache_bytes=self.parts.storage.nbytes, kv_host_bytes=self.parts.storage.host_nbytes,
            num_kv_blocks_offloaded=self.kv.num_offloaded,
            prefix_cache_queries=s.prefix_queries, prefix_cache_hits=s.prefix_hits,
            num_preemptions=s.num_preemptions, num_prompt_tokens=self.num_prompt_tokens,
            num_fair_preemptions=s.num_fair_preemptions, client_token_shares=s.policy.shares(),
            num_generation_tokens=self.num_generation_tokens, num_steps=self.num_steps,
            speculative=self._spec_stats(),
            decode_weight_bytes_per_s=self.decode_weight_bytes / self.decode_step_s if self.decode_step_s else 0.0)

    def use_proposer(self, proposer: "Proposer", exact_rows_only: bool = True) -> None:
        """Draft with `proposer` (ferry/speculative/base.py's port) instead of the --speculative-method's own: a
        research proposer, or a benchmark's scripted one. exact_rows_only=False lifts the rows-per-step cap that
        keeps greedy output exact (for measuring verification cost, never for serving)."""
        spec = self.parts.speculator
        if spec is None:
            raise InvalidRequest("use_proposer needs an engine built with a --speculative-method")
        spec.proposer = proposer
        if not exact_rows_only:
            spec.max_rows = None

    def view(self) -> EngineView:
        """A read-only snapshot for code outside the engine (eval, bench, tests)."""
        s, kv, cfg = self.scheduler, self.kv, self.config
        storage = self.parts.storage
        return EngineView(
            max_model_len=self.max_model_len, vocab_size=self.model_config.vocab_size, block_size=cfg.cache.block_size,
            max_num_batched_tokens=cfg.scheduler.max_num_batched_tokens, kv_cache_memory=cfg.cache.kv_cache_memory,
            kv_policy=kv.policy, moe=self.model_config.moe,
            num_kv_blocks=kv.pool.num_blocks, num_kv_blocks_used=kv.pool.num_used, max_kv_blocks_used=kv.max_blocks_used,
            num_host_blocks=kv.host.num_blocks, num_host_blocks_used=kv.host.num_blocks - kv.host.num_free,
            max_host_blocks_used=kv.max_host_blocks_used, kv_cache_bytes=storage.nbytes,
            kv_host_bytes=storage.host_nbytes,
            running=tuple(RequestView(r.req_id, r.num_prompt_tokens, r.num_computed_tokens, r.num_tokens,
                                      r.num_output_tokens) for r in s.running),
            num_waiting=len(s.waiting), num_preemptions=s.num_preemptions, prefix_cache_hits=s.prefix_hits,
            kv_stats=dict(getattr(storage, "stats", {})),
            experts=self._expert_stats(), speculative=self._spec_stats())

    def _expert_stats(self) -> ExpertStats | None:
        """The store's counters, and the offload setting in force (its tuner's)."""
        store, tuner = self.parts.experts, self.parts.expert_tuner
        if store is None:
            return None
        s = store.stats()
        if tuner is not None:
            s.offload_setting, s.num_offload_switches = str(tuner.current), tuner.num_switches
        return s

    def _spec_stats(self) -> dict | None:
        spec = self.parts.speculator
        if spec is None:
            return None
        held = getattr(spec.proposer, "held", None)  # a draft model's own KV: blocks and sequences it holds
        return {"method": spec.method, **spec.stats.as_dict(), **(held() if held is not None else {})}

    @property
    def routing(self) -> RoutingObservers:
        """The model's routing port: add an observer to see every MoE layer's routing (eval's recorder)."""
        return self.parts.runner.model.routing

    def expert_plan(self, max_num_seqs: int) -> Plan | None:
        """The expert store's I/O-compute plan (--explain) for up to max_num_seqs sequences per step, from costs
        measured now (the probe empties the expert cache and zeroes its counters); None without --expert-store."""
        store, moe = self.parts.experts, self.model_config.moe
        if store is None:
            return None
        num_moe_layers = sum(bool(x) for x in moe.sparse_layers)
        return make_plan(measure_costs(store), moe.num_experts, moe.top_k, num_moe_layers, store.cache.num_slots,
                         max_num_seqs)


def decode_weight_bytes(model: torch.nn.Module, cfg: ModelConfig) -> int:
    """Weight bytes a decode step reads, a constant of the model: every parameter and buffer but the embedding
    table when it is not also the lm_head (a step reads only its rows), routed experts at top_k of num_experts
    (what batch 1 reads; offloaded experts are not resident and not counted)."""
    total = 0
    held = ((n, t.numel() * t.element_size()) for n, t in itertools.chain(model.named_parameters(),
                                                                          model.named_buffers()))
    for name, nbytes in itertools.chain(held, quantized_nbytes(model)):  # quantized: codes and scales
        if name == "embed" and not cfg.tie_word_embeddings:
            continue
        share = cfg.moe.top_k / cfg.moe.num_experts if cfg.moe and ".experts." in name else 1.0
        total += int(nbytes * share)
    return total


def input_limits(parts: EngineParts) -> InputLimits:
    """What the input processor checks prompts against, from what the factory built."""
    return InputLimits(parts.max_model_len, parts.model_config.vocab_size, parts.kv.policy.name,
                       tuple(name for name, cls in KV_POLICIES.items() if cls.per_request_budget))
