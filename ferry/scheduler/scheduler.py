"""Iteration-level scheduler (pure Python, no torch).

There is no prefill or decode phase: each request has num_computed_tokens and num_tokens, and a step
gives some requests some tokens within a token budget. That covers chunked prefill (a long prompt takes
several steps), mixing prefill chunks with decodes, prefix-cache hits (computed tokens that start > 0)
and recompute after preemption (num_computed_tokens back to 0)."""
from __future__ import annotations

from dataclasses import replace

from ferry.config import SchedulerConfig
from ferry.kvcache.manager import KVCacheManager
from ferry.plan import ScheduledReq, StepPlan, StepResult
from ferry.request import FinishReason, Request, RequestStatus
from ferry.scheduler.base import SchedulingPolicy
from ferry.speculative import Speculator


class Scheduler:
    def __init__(self, cfg: SchedulerConfig, kv: KVCacheManager, policy: SchedulingPolicy,
                 speculator: Speculator | None = None) -> None:
        """speculator: drafts tokens for decoding requests to verify in the step (None: no speculation)."""
        self.cfg = cfg
        self.kv = kv
        self.policy = policy
        self.speculator = speculator
        self.waiting: list[Request] = []
        self.running: list[Request] = []  # admission order
        self.requests: dict[str, Request] = {}
        self._finished_ids: list[str] = []  # since the last plan, for the runner to drop state
        self.num_preemptions = 0
        self.num_fair_preemptions = 0  # of which to give a waiting client its share (the policy's displace)
        self.prefix_queries = 0
        self.prefix_hits = 0

    # -- queue management -------------------------------------------------------------------------

    def add(self, req: Request) -> None:
        self.requests[req.req_id] = req
        self.waiting.append(req)

    def finish(self, req_id: str, reason: FinishReason) -> Request | None:
        """End a request now (abort, stop string, error). Returns it, or None if unknown / already done."""
        req = self.requests.pop(req_id, None)
        if req is None:
            return None
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self._release(req, reason)
        return req

    def _release(self, req: Request, reason: FinishReason) -> None:
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        self.kv.free(req)
        self.kv.drop_swapped(req)
        self.policy.release(req)
        self._finished_ids.append(req.req_id)
        if self.speculator is not None:
            self.speculator.release(req.req_id)

    # -- live migration (ferry/engine/migration.py drives these) ---------------------------------

    def suspend(self, req_id: str) -> Request | None:
        """Take a running request out of the steps, keeping its blocks (a migration's stop-and-copy); None when it
        is not running. It stays known: finish() (an abort meanwhile) still frees its blocks."""
        req = self.requests.get(req_id)
        if req is None or req.status is not RequestStatus.RUNNING:
            return None
        self.running.remove(req)
        req.status = RequestStatus.MIGRATING
        return req

    def unsuspend(self, req_id: str) -> bool:
        """The migration was called off: the suspended request runs here again (False when it ended meanwhile)."""
        req = self.requests.get(req_id)
        if req is None or req.status is not RequestStatus.MIGRATING:
            return False
        req.status = RequestStatus.RUNNING
        self.running.append(req)
        return True

    def adopt(self, req: Request) -> None:
        """A request arriving by migration, its KV already in its block table (num_computed_tokens of it): it
        runs from the next step on, as if it had been admitted here."""
        self.requests[req.req_id] = req
        req.status = RequestStatus.RUNNING
        self.running.append(req)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # -- one step ---------------------------------------------------------------------------------

    def schedule(self) -> StepPlan:
        plan = StepPlan(finished_req_ids=self._finished_ids, swap_out=self.kv.take_offloads())
        self._finished_ids = []
        budget = self.cfg.max_num_batched_tokens
        scheduled: set[str] = set()
        preempted = False
        self._rebalance(plan)

        for req in list(self.running):
            if budget == 0:
                break
            if req.status is not RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            while (table := self.kv.allocate_slots(req, num_new)) is None:
                candidates = [r for r in self.running if r.req_id not in scheduled]
                victim = self.policy.pick_victim(candidates)
                self._preempt(victim, plan)
                preempted = True
                if victim is req:
                    break
            if table is None:
                continue
            plan.reqs.append(self._scheduled(req, num_new, table))
            scheduled.add(req.req_id)
            budget -= num_new

        if not preempted:
            self._admit(plan, budget)
        if self.speculator is not None:
            self._add_drafts(plan)
        plan.swap_out.extend(self.kv.take_offloads())  # prefix hits that went cold on admission
        return plan

    def _rebalance(self, plan: StepPlan) -> None:
        """Preempt the running requests the policy names (fair: over-served clients') while the waiting request it
        names cannot start: no free running slot, or fewer free KV blocks than its tokens need (ignoring prefix hits:
        at worst one switch comes early). At most one preemption per running request."""
        for _ in range(len(self.running)):
            named = self.policy.displace(self.running, self.waiting)
            if named is None:
                return
            req, victim = named
            if len(self.running) < self.cfg.max_num_seqs and \
                    self.kv.pool.num_free >= self.kv.num_blocks_for(req.num_tokens):
                return
            self._preempt(victim, plan)
            self.num_fair_preemptions += 1

    def _admit(self, plan: StepPlan, budget: int) -> None:
        for req in self.policy.order(self.waiting, self.running):
            if budget == 0 or len(self.running) >= self.cfg.max_num_seqs:
                break
            if req.swapped_block_ids is not None:
                num_new = min(req.num_tokens - req.num_computed_tokens, budget)
                swapped = self.kv.swap_in(req, num_new, self.policy.reuse_swapped_kv)
                if swapped is None:
                    break
                pairs, table = swapped
                plan.swap_in.extend(pairs)
            else:
                if self.cfg.whole_prompts and budget < req.num_tokens - req.num_computed_tokens <= self._room(plan):
                    break  # it fits a step: start it in the next one rather than split it here
                # A prompt scored token by token must be computed in full: no prefix-cache hit.
                computed, num_cached = ([], 0) if req.params.prompt_logprobs is not None else self.kv.get_computed_blocks(req)
                num_new = min(req.num_tokens - num_cached, budget)
                # the blocks needed count from the cached prefix on: set it before asking (and undo on refusal)
                prev, req.num_computed_tokens = req.num_computed_tokens, num_cached
                if not self.kv.can_allocate(req, num_new, computed):
                    req.num_computed_tokens = prev
                    break
                table = self.kv.allocate_slots(req, num_new, computed)
                if req.num_preemptions == 0:
                    req.num_cached_prompt_tokens = num_cached
                    self.prefix_queries += req.num_prompt_tokens
                    self.prefix_hits += num_cached
            self.waiting.remove(req)
            self.running.append(req)
            req.status = RequestStatus.RUNNING
            plan.reqs.append(self._scheduled(req, num_new, table))
            budget -= num_new

    def _add_drafts(self, plan: StepPlan) -> None:
        """Give this step's decodes draft tokens to verify, in the rows left once every running and admitted request
        has its tokens (drafts never cost a request its place nor preempt one): within the step's token budget and
        the speculator's row limit (rows past it may not compute a row exactly as a one-row decode would)."""
        decodes = [i for i, s in enumerate(plan.reqs) if s.sample and len(s.token_ids) == 1]
        if self.speculator.routes:
            self._route_first_tokens(plan)
        rows = plan.num_tokens
        room = self.cfg.max_num_batched_tokens - rows
        if self.speculator.max_rows is not None:
            room = min(room, self.speculator.max_rows - rows)
        spec = self.speculator
        if not decodes or (room < 1 and not spec.routes):  # route: a run of just the next token needs no row
            spec.skip_step(len(decodes))
            return
        reqs = [self.requests[plan.reqs[i].req_id] for i in decodes]
        drafts = spec.draft(reqs, max(0, room), rows - len(decodes))
        for i, req in zip(decodes, reqs):
            draft, next_token = drafts.get(req.req_id), spec.next_token(req.req_id)
            if (draft or (draft is not None and next_token is not None)) and \
                    (table := self.kv.allocate_slots(req, 1 + len(draft))) is not None:
                s = self._scheduled(req, 1 + len(draft), table, draft)
                plan.reqs[i] = replace(s, route=True, route_next_token=next_token) if spec.routes else s

    def _route_first_tokens(self, plan: StepPlan) -> None:
        """Route mode: the token after a prompt (the chunk that ends it samples) is the small model's too unless the
        router sends it to the target: no extra rows (the chunk is computed anyway), only the sample is replaced."""
        firsts = [i for i, s in enumerate(plan.reqs) if s.sample and len(s.token_ids) > 1 and not s.draft_token_ids]
        if not firsts:
            return
        reqs = [self.requests[plan.reqs[i].req_id] for i in firsts]
        self.speculator.draft(reqs, 0)
        for i, req in zip(firsts, reqs):
            next_token = self.speculator.next_token(req.req_id)
            if next_token is not None:
                plan.reqs[i] = replace(plan.reqs[i], route=True, route_next_token=next_token)

    def _room(self, plan: StepPlan) -> int:
        """The most prompt tokens a step can hold next to this step's decodes."""
        return self.cfg.max_num_batched_tokens - sum(len(r.token_ids) == 1 for r in plan.reqs)

    def _scheduled(self, req: Request, num_new: int, table: list[int], draft: list[int] = ()) -> ScheduledReq:
        start = req.num_computed_tokens
        num_known = num_new - len(draft)
        return ScheduledReq(
            req_id=req.req_id,
            token_ids=req.all_token_ids[start:start + num_known] + list(draft),
            start_pos=start,
            block_ids=list(table),
            sample=start + num_known == req.num_tokens,
            params=req.params,
            all_token_ids=req.all_token_ids,
            num_prompt_tokens=req.num_prompt_tokens,
            seed_offset=req.seed_offset,
            kv=self.kv.plan_step(req, num_new, table),
            draft_token_ids=list(draft),
        )

    def _preempt(self, req: Request, plan: StepPlan) -> None:
        self.running.remove(req)
        if self.cfg.preemption_mode == "swap" and self.kv.can_swap_out(req):
            plan.swap_out.extend(self.kv.swap_out(req))
        else:
            self.kv.free(req)
            req.num_computed_tokens = 0
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.insert(0, req)

    def update(self, plan: StepPlan, result: StepResult) -> list[Request]:
        """Advance the scheduled requests; returns those that got a new token (finished ones included)."""
        progressed = []
        for s in plan.reqs:
            req = self.requests.get(s.req_id)
            if req is None:  # finished while the step ran
                continue
            if s.draft_token_ids or s.route:
                new = result.spec_token_ids[s.req_id]
                self._verified(req, s, len(new) - 1)
            else:
                req.num_computed_tokens = s.start_pos + len(s.token_ids)
                self.kv.commit_step(req, s)
                new = [result.sampled_token_ids[s.req_id]] if s.sample else []
            self.policy.charge(req)
            if not new:
                continue
            for token in new:
                req.append_output(token)
                reason = self._stop_reason(req)
                if reason is not None:
                    self.running.remove(req)
                    del self.requests[req.req_id]
                    self._release(req, reason)
                    break
            if self.speculator is not None and not req.finished:
                self.speculator.observe(req, len(new))
            progressed.append(req)
        self.policy.end_step()
        return progressed

    def _verified(self, req: Request, s: ScheduledReq, num_accepted: int) -> None:
        """req verified s.draft_token_ids and kept the first num_accepted: its KV counts its last known token and
        those; the rejected drafts' slots are dropped (tail blocks freed) before the prefix cache sees a block.
        (Route mode keeps every draft: nothing is dropped.)"""
        req.num_computed_tokens = s.start_pos + len(s.token_ids) - len(s.draft_token_ids) + num_accepted
        self.kv.rollback(req)
        self.kv.commit_step(req, s)
        self.speculator.record(req, len(s.draft_token_ids), num_accepted)

    def _stop_reason(self, req: Request) -> FinishReason | None:
        token, p = req.output_token_ids[-1], req.params
        if req.num_output_tokens >= p.min_tokens:
            if token in p.stop_token_ids:
                req.stop_reason = token
                return FinishReason.STOP
            if not p.ignore_eos and token in req.eos_token_ids:
                return FinishReason.STOP
        if p.max_tokens is not None and req.num_output_tokens >= p.max_tokens:
            return FinishReason.LENGTH
        if req.num_tokens >= req.max_model_len:
            return FinishReason.LENGTH
        return None
