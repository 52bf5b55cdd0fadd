"""Logit penalties, applied in place to a [R, V] float tensor (R = the rows that need them).

- repetition_penalty (HF / vLLM): for every token that occurs in the prompt OR the output,
  logit > 0 -> logit / p, else logit * p. 1 disables it.
- frequency_penalty, presence_penalty (OpenAI): over the output tokens only,
  logit -= frequency * count + presence * (count > 0). 0 disables them.
Repetition first, then frequency / presence (vLLM's order).

Only the logits of tokens that occur are touched: the token lists are flattened once into flat
indices row * V + token (one Python pass), and the penalties are a gather / compute / scatter
over those, with no full [R, V] arithmetic. A token occurring several times appears several
times in the index; every copy writes the same value, so that is harmless.
"""
from __future__ import annotations

from typing import Sequence

import torch


def apply_penalties(
    logits: torch.Tensor,
    token_ids: Sequence[Sequence[int]],
    num_prompt_tokens: Sequence[int],
    repetition: Sequence[float],
    presence: Sequence[float],
    frequency: Sequence[float],
) -> torch.Tensor:
    """Apply the penalties to `logits` [R, V] in place and return it.

    Row i's tokens are token_ids[i] (prompt + output so far); its first num_prompt_tokens[i] are
    the prompt. Token ids outside [0, V) are ignored.
    """
    num_rows, vocab = logits.shape
    if not (len(token_ids) == len(num_prompt_tokens) == len(repetition) == len(presence) == len(frequency) == num_rows):
        raise ValueError("apply_penalties: one entry per row expected in every list")
    need_rep = any(p != 1.0 for p in repetition)
    need_out = any(p != 0.0 for p in presence) or any(f != 0.0 for f in frequency)
    if num_rows == 0 or not (need_rep or need_out):
        return logits
    work = logits if logits.is_contiguous() else logits.contiguous()
    flat_logits = work.view(-1)
    device = logits.device

    # rows that need a repetition penalty contribute prompt + output, the others only output
    flat: list[int] = []
    lengths: list[int] = []
    prompt_lens: list[int] = []  # per row: how many of its flattened tokens are prompt tokens
    for ids, npt, rep in zip(token_ids, num_prompt_tokens, repetition):
        if rep != 1.0:
            flat.extend(ids)
            lengths.append(len(ids))
            prompt_lens.append(min(npt, len(ids)))
        else:
            out = ids[npt:]
            flat.extend(out)
            lengths.append(len(out))
            prompt_lens.append(0)
    if not flat:
        return logits
    tokens = torch.tensor(flat, dtype=torch.long)
    lens = torch.tensor(lengths, dtype=torch.long)
    rows = torch.repeat_interleave(torch.arange(num_rows), lens)
    offsets = torch.cumsum(lens, 0) - lens
    pos = torch.arange(tokens.numel()) - torch.repeat_interleave(offsets, lens)
    is_output = pos >= torch.repeat_interleave(torch.tensor(prompt_lens, dtype=torch.long), lens)
    valid = (tokens >= 0) & (tokens < vocab)
    if not bool(valid.all()):
        tokens, rows, is_output = tokens[valid], rows[valid], is_output[valid]
    keys = (rows * vocab + tokens).to(device)
    rows = rows.to(device)

    if need_rep:
        rep = torch.tensor(repetition, dtype=logits.dtype, device=device)[rows]
        vals = flat_logits[keys]
        flat_logits[keys] = torch.where(vals > 0, vals / rep, vals * rep)

    if need_out:
        out_mask = is_output.to(device)
        out_keys, out_rows = keys[out_mask], rows[out_mask]
        if out_keys.numel():
            # exact per-token counts: accumulate ones into a scratch row-major [R * V] buffer
            counts = torch.zeros_like(flat_logits)
            counts.index_put_((out_keys,), torch.ones_like(out_keys, dtype=counts.dtype), accumulate=True)
            cnt = counts[out_keys]
            freq = torch.tensor(frequency, dtype=logits.dtype, device=device)[out_rows]
            pres = torch.tensor(presence, dtype=logits.dtype, device=device)[out_rows]
            flat_logits[out_keys] = flat_logits[out_keys] - (freq * cnt + pres)

    if work is not logits:
        logits.copy_(work)
    return logits
