"""StepPlan -> model input tensors. Pure function of the plan, testable without a model. The KV policy's decisions
of each request (ScheduledReq.kv) go to AttnMetadata.decode_kv / PrefillChunk.kv for the tensor side.

Layout: single-token requests first (their attention is batched), then prefill chunks."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ferry.models.layers.attention import AttnMetadata, PrefillChunk
from ferry.plan import ScheduledReq, StepPlan


@dataclass
class ModelInputs:
    input_ids: torch.Tensor  # [T] long
    meta: AttnMetadata
    logits_indices: torch.Tensor  # [S] rows whose logits are needed (last token of each sampling request)
    sample_reqs: list[ScheduledReq]  # the S requests, in logits row order
    # prompt_logprobs requests: (request, position of the first scored token, next-token targets); their
    # logits rows follow the S sampling rows in logits_indices, in this order
    prompt_scored: list[tuple[ScheduledReq, int, list[int]]]


def build_inputs(plan: StepPlan, block_size: int, device: torch.device) -> ModelInputs:
    decodes = [r for r in plan.reqs if len(r.token_ids) == 1]
    prefills = [r for r in plan.reqs if len(r.token_ids) > 1]
    ordered = decodes + prefills
    token_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    logits_rows: list[int] = []
    sample_reqs: list[ScheduledReq] = []
    chunks: list[PrefillChunk] = []
    scored: list[tuple[ScheduledReq, int, list[int]]] = []
    scored_rows: list[int] = []
    for r in ordered:
        q_start = len(token_ids)
        n = len(r.token_ids)
        token_ids.extend(r.token_ids)
        pos = range(r.start_pos, r.start_pos + n)
        positions.extend(pos)
        slots.extend(r.block_ids[p // block_size] * block_size + p % block_size for p in pos)
        if n > 1:
            table = torch.tensor(r.block_ids, dtype=torch.long, device=device)
            chunks.append(PrefillChunk(q_start, n, r.start_pos, table, r.kv))
        if r.sample:
            logits_rows.append(q_start + n - 1)
            sample_reqs.append(r)
        if r.params.prompt_logprobs is not None:  # score each prompt token from the one before it
            targets = r.all_token_ids[r.start_pos + 1:min(r.start_pos + n, r.num_prompt_tokens - 1) + 1]
            if targets:
                scored.append((r, r.start_pos + 1, targets))
                scored_rows.extend(range(q_start, q_start + len(targets)))
    max_blocks = max((len(r.block_ids) for r in decodes), default=0)
    tables = [r.block_ids + [0] * (max_blocks - len(r.block_ids)) for r in decodes]

    def t(x: list) -> torch.Tensor:
        return torch.tensor(x, dtype=torch.long, device=device)

    meta = AttnMetadata(
        positions=t(positions),
        slot_mapping=t(slots),
        block_size=block_size,
        num_decodes=len(decodes),
        decode_block_tables=t(tables).view(len(decodes), max_blocks),
        decode_ctx_lens=t([r.start_pos + 1 for r in decodes]),
        prefills=chunks,
        decode_kv=[r.kv for r in decodes],
    )
    return ModelInputs(t(token_ids), meta, t(logits_rows + scored_rows), sample_reqs, scored)
