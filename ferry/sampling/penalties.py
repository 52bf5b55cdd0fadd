"""Logit penalties, applied in place to a [R, V] float tensor (R = the rows that need them).

- repetition_penalty (HF / vLLM): for every token that occurs in the prompt OR the output,
  logit > 0 -> logit / p, else logit * p. 1 disables it.
- frequency_penalty, presence_penalty (OpenAI): over the output tokens only,
  logit -= frequency * count + presence * (count > 0). 0 disables them.

Token counts are built with one scatter per call from the flattened token lists; only the
tensors some row needs are built.
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
    assert len(token_ids) == len(num_prompt_tokens) == len(repetition) == len(presence) == len(frequency) == num_rows
    need_rep = any(p != 1.0 for p in repetition)
    need_out = any(p != 0.0 for p in presence) or any(f != 0.0 for f in frequency)
    if num_rows == 0 or not (need_rep or need_out):
        return logits
    device = logits.device

    # Flatten the tokens the penalties look at: prompt + output if a repetition penalty is on,
    # else only the output.
    flat: list[int] = []
    lengths: list[int] = []
    starts: list[int] = []  # per row, where the output starts inside its own slice
    for ids, npt in zip(token_ids, num_prompt_tokens):
        if need_rep:
            flat.extend(ids)
            lengths.append(len(ids))
            starts.append(npt)
        else:
            out = ids[npt:]
            flat.extend(out)
            lengths.append(len(out))
            starts.append(0)
    tokens = torch.tensor(flat, dtype=torch.long)
    lens = torch.tensor(lengths, dtype=torch.long)
    rows = torch.repeat_interleave(torch.arange(num_rows), lens)
    is_output = None
    if need_rep:
        # position of each token within its row, compared to the row's prompt length
        offsets = torch.cumsum(lens, 0) - lens
        pos = torch.arange(tokens.numel()) - torch.repeat_interleave(offsets, lens)
        is_output = pos >= torch.repeat_interleave(torch.tensor(starts, dtype=torch.long), lens)
    if tokens.numel() and (int(tokens.max()) >= vocab or int(tokens.min()) < 0):
        ok = (tokens >= 0) & (tokens < vocab)
        tokens, rows = tokens[ok], rows[ok]
        if is_output is not None:
            is_output = is_output[ok]
    tokens, rows = tokens.to(device), rows.to(device)

    counts = None  # output-token counts [R, V]
    if need_out:
        counts = torch.zeros(num_rows, vocab, dtype=logits.dtype, device=device)
        if is_output is not None:
            is_output = is_output.to(device)
            out_rows, out_tokens = rows[is_output], tokens[is_output]
        else:
            out_rows, out_tokens = rows, tokens
        counts.index_put_((out_rows, out_tokens), torch.ones_like(out_tokens, dtype=logits.dtype), accumulate=True)

    if need_rep:
        seen = torch.zeros(num_rows, vocab, dtype=torch.bool, device=device)
        seen[rows, tokens] = True
        rep = torch.tensor(repetition, dtype=logits.dtype, device=device).unsqueeze(1)
        penalized = torch.where(logits > 0, logits / rep, logits * rep)
        logits.copy_(torch.where(seen, penalized, logits))

    if need_out:
        assert counts is not None
        freq = torch.tensor(frequency, dtype=logits.dtype, device=device).unsqueeze(1)
        pres = torch.tensor(presence, dtype=logits.dtype, device=device).unsqueeze(1)
        logits.sub_(counts * freq + (counts > 0).to(logits.dtype) * pres)
    return logits
