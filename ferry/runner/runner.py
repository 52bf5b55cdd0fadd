"""Executes a StepPlan: KV swaps, the forward pass, sampling. Owns the model, the KV tensors and the sampler."""
from __future__ import annotations

import torch

from ferry.kvcache.storage import KVStorage
from ferry.models.decoder import DecoderModel
from ferry.plan import StepPlan, StepResult
from ferry.runner.inputs import build_inputs
from ferry.sampling import Sampler


class Runner:
    def __init__(self, model: DecoderModel, storage: KVStorage, sampler: Sampler, block_size: int,
                 device: torch.device) -> None:
        self.model = model
        self.storage = storage
        self.sampler = sampler
        self.block_size = block_size
        self.device = device

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> StepResult:
        self.sampler.release(plan.finished_req_ids)
        self.storage.swap_out(plan.swap_out)  # before swap_in and the forward: those may reuse the blocks
        self.storage.swap_in(plan.swap_in)
        result = StepResult()
        if not plan.reqs:
            return result
        inputs = build_inputs(plan, self.block_size, self.device)
        logits = self.model(inputs.input_ids, inputs.meta, self.storage.layers, inputs.logits_indices)
        if inputs.sample_reqs:
            tokens, logprobs = self.sampler(logits, inputs.sample_reqs)
            for r, tok, lp in zip(inputs.sample_reqs, tokens, logprobs):
                result.sampled_token_ids[r.req_id] = tok
                if lp is not None:
                    result.logprobs[r.req_id] = lp
        return result
