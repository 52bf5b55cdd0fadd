"""StepPlan -> model input tensors. Pure function of the plan, testable without a model. The KV policy's decisions
of each request (ScheduledReq.kv) go to AttnMetadata.decode_kv / PrefillChunk.kv for the tensor side.

Layout: single-token requests first (their attention is batched), then prefill chunks. A request with draft
tokens (speculative decoding) is laid out as one decode row per token, over its growing context: each row reads
exactly what a one-token decode at its position would (the step's K/V are written before any row reads), through
the same kernel, so it computes the same numbers. A route request (R2R) with drafts is laid out the same way (a
prompt's last chunk with route set stays a chunk); only its last row samples, when the router sent that token to
the target."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

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
    # requests with draft tokens: (request, its first row in sample_reqs); each of its len(token_ids) rows samples
    # as a one-token decode at that point of its context would (sample_reqs holds a view of it per row)
    verified: list[tuple[ScheduledReq, int]] = field(default_factory=list)


def row_views(r: ScheduledReq) -> list[ScheduledReq]:
    """One view of r per row of its verification: row i samples after r.draft_token_ids[:i], so penalties and
    min_tokens see that context (rows after a rejected draft are discarded anyway)."""
    return [replace(r, token_ids=[t], start_pos=r.start_pos + i, all_token_ids=r.all_token_ids + r.draft_token_ids[:i],
                    draft_token_ids=[])
            for i, t in enumerate(r.token_ids)]


def build_inputs(plan: StepPlan, block_size: int, device: torch.device) -> ModelInputs:
    decodes = [r for r in plan.reqs if len(r.token_ids) == 1 or r.draft_token_ids]
    prefills = [r for r in plan.reqs if len(r.token_ids) > 1 and not r.draft_token_ids]
    token_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    logits_rows: list[int] = []
    sample_reqs: list[ScheduledReq] = []
    chunks: list[PrefillChunk] = []
    scored: list[tuple[ScheduledReq, int, list[int]]] = []
    scored_rows: list[int] = []
    verified: list[tuple[ScheduledReq, int]] = []
    ctx_lens: list[int] = []  # per decode row
    tables: list[list[int]] = []  # per decode row
    decode_kv = []  # per decode row
    for r in decodes + prefills:
        q_start = len(token_ids)
        n = len(r.token_ids)
        token_ids.extend(r.token_ids)
        pos = range(r.start_pos, r.start_pos + n)
        positions.extend(pos)
        slots.extend(r.block_ids[p // block_size] * block_size + p % block_size for p in pos)
        if n == 1 or r.draft_token_ids:
            ctx_lens.extend(p + 1 for p in pos)
            tables.extend([r.block_ids] * n)
            decode_kv.extend([r.kv] * n)
        else:
            table = torch.tensor(r.block_ids, dtype=torch.long, device=device)
            chunks.append(PrefillChunk(q_start, n, r.start_pos, table, r.kv))
        if r.route:  # trusted drafts: only the row after the last one samples, and only when it is routed
            if r.route_next_token is None:
                logits_rows.append(q_start + n - 1)
                sample_reqs.append(row_views(r)[-1])
        elif r.draft_token_ids:
            verified.append((r, len(sample_reqs)))
            logits_rows.extend(range(q_start, q_start + n))
            sample_reqs.extend(row_views(r))
        elif r.sample:
            logits_rows.append(q_start + n - 1)
            sample_reqs.append(r)
        if r.params.prompt_logprobs is not None:  # score each prompt token from the one before it
            targets = r.all_token_ids[r.start_pos + 1:min(r.start_pos + n, r.num_prompt_tokens - 1) + 1]
            if targets:
                scored.append((r, r.start_pos + 1, targets))
                scored_rows.extend(range(q_start, q_start + len(targets)))
    max_blocks = max((len(b) for b in tables), default=0)
    tables = [b + [0] * (max_blocks - len(b)) for b in tables]

    def t(x: list) -> torch.Tensor:
        return torch.tensor(x, dtype=torch.long, device=device)

    meta = AttnMetadata(
        positions=t(positions),
        slot_mapping=t(slots),
        block_size=block_size,
        num_decodes=len(ctx_lens),
        decode_block_tables=t(tables).view(len(ctx_lens), max_blocks),
        decode_ctx_lens=t(ctx_lens),
        prefills=chunks,
        decode_kv=decode_kv,
    )
    return ModelInputs(t(token_ids), meta, t(logits_rows + scored_rows), sample_reqs, scored, verified)
