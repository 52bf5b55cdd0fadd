"""Executes a StepPlan: KV swaps, the forward pass, sampling. Owns the model, the KV tensors and the sampler."""
from __future__ import annotations

import torch

from ferry.models.decoder import DecoderModel
from ferry.runner.kv import PolicyKV
from ferry.plan import StepPlan, StepResult
from ferry.request import TokenLogprob
from ferry.runner.inputs import build_inputs
from ferry.runner.verify import accept, routed
from ferry.sampling import Sampler


class Runner:
    def __init__(self, model: DecoderModel, storage: PolicyKV, sampler: Sampler, block_size: int,
                 device: torch.device) -> None:
        self.model = model
        self.storage = storage
        self.sampler = sampler
        self.block_size = block_size
        self.device = device

    def execute(self, plan: StepPlan) -> StepResult:
        self.prepare(plan)
        return self.forward(plan)

    def prepare(self, plan: StepPlan) -> None:
        """The plan's state changes that happen once, whatever happens to its forward: released requests, swaps, the KV
        policy's own (layer-budget's compaction)."""
        self.sampler.release(plan.finished_req_ids)
        self.storage.swap_out(plan.swap_out)  # before swap_in and the forward: those may reuse the blocks
        self.storage.swap_in(plan.swap_in)
        self.storage.prepare(plan)  # after the swaps: it may move the KV of blocks just swapped in

    @torch.inference_mode()
    def forward(self, plan: StepPlan) -> StepResult:
        """The forward and sampling of plan.reqs. Re-runnable on a part of them (KV of the step's tokens is
        written again at the same slots; seeded draws are restored with sampler.restore)."""
        result = StepResult()
        if not plan.reqs:
            return result
        inputs = build_inputs(plan, self.block_size, self.device)
        inputs.meta.kv_state = self.storage.begin_step(inputs.meta)
        logits = self.storage.forward(self.model, inputs.input_ids, inputs.meta, inputs.logits_indices)
        num_sample = len(inputs.sample_reqs)
        if inputs.prompt_scored:
            self._score_prompts(logits[num_sample:], inputs.prompt_scored, result)
        if inputs.sample_reqs:
            snap = self.sampler.snapshot(r.req_id for r, _ in inputs.verified) if inputs.verified else None
            tokens, logprobs = self.sampler(logits[:num_sample], inputs.sample_reqs)
            verified_rows = set()
            for r, first in inputs.verified:
                n = len(r.token_ids)
                kept = accept(r.draft_token_ids, tokens[first:first + n])
                result.spec_token_ids[r.req_id] = kept
                if r.params.logprobs is not None:  # row i sampled kept[i]: its logprobs are kept[i]'s
                    result.spec_logprobs[r.req_id] = list(logprobs[first:first + len(kept)])
                self.sampler.keep_draws(snap, r, len(kept))  # the rejected rows' draws are taken back
                verified_rows.update(range(first, first + n))
            for i, (r, tok, lp) in enumerate(zip(inputs.sample_reqs, tokens, logprobs)):
                if i in verified_rows:
                    continue
                result.sampled_token_ids[r.req_id] = tok
                if lp is not None:
                    result.logprobs[r.req_id] = lp
        for r in plan.reqs:
            if r.route:
                result.spec_token_ids[r.req_id] = routed(r, result.sampled_token_ids)
        return result

    @staticmethod
    def _score_prompts(logits: torch.Tensor, scored: list, result: StepResult) -> None:
        """Logprob of each prompt token given the ones before it (and the top-k), for prompt_logprobs."""
        lp = torch.log_softmax(logits.float(), dim=-1)
        row = 0
        for r, first_pos, targets in scored:
            n = len(targets)
            rows = lp[row:row + n]
            picked = rows.gather(1, torch.tensor(targets, device=rows.device)[:, None])[:, 0].tolist()
            k = r.params.prompt_logprobs
            top_v, top_i = rows.topk(k, dim=-1) if k else (rows[:, :0], rows[:, :0].long())
            top_v, top_i = top_v.tolist(), top_i.tolist()
            result.prompt_logprobs[r.req_id] = (first_pos, [
                TokenLogprob(t, p, list(zip(ti, tv))) for t, p, ti, tv in zip(targets, picked, top_i, top_v)])
            row += n
