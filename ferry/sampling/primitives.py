"""Sampling's tensor primitives, row-local and batched: a blocked argmax / top-k faster than torch's on CPU,
top-k / top-p masking in place, and inverse-CDF draws from one uniform per row (ferry/sampling/sampler.py runs
them on the rows that need each)."""
from __future__ import annotations

import torch


def index_tensor(values: list[int], device: torch.device) -> torch.Tensor:
    """Row or column ids as a long tensor."""
    return torch.tensor(values, dtype=torch.long, device=device)


_BLOCK = 128  # block size of fast_argmax / fast_topk
_FAST_TOPK_MAX_K = 32
_TOP_P_CANDIDATES = (64, 1024)  # top_p first looks for the nucleus among this many tokens, then the rest


def fast_argmax(x: torch.Tensor) -> torch.Tensor:
    """torch.argmax(x, -1) of a [R, V] tensor (same result: the first maximum), faster on CPU,
    where argmax is not vectorized but amax is: find the first block of _BLOCK entries holding
    the row maximum, then argmax inside that block only."""
    num_rows, vocab = x.shape
    if x.device.type != "cpu" or vocab < 4 * _BLOCK or num_rows == 0:
        return x.argmax(dim=-1)
    nb = vocab // _BLOCK
    block_max = x[:, : nb * _BLOCK].unflatten(1, (nb, _BLOCK)).amax(dim=-1)
    if nb * _BLOCK < vocab:
        block_max = torch.cat([block_max, x[:, nb * _BLOCK :].amax(dim=-1, keepdim=True)], dim=1)
    first = (block_max == block_max.amax(dim=-1, keepdim=True)).to(torch.uint8).argmax(dim=-1)
    # the window of the last, partial block repeats index V-1 at its end: the first maximum
    # of the window is still the right one
    cols = ((first * _BLOCK).unsqueeze(1) + torch.arange(_BLOCK, device=x.device)).clamp_(max=vocab - 1)
    inner = x.gather(1, cols).argmax(dim=-1, keepdim=True)
    return cols.gather(1, inner).squeeze(1)


def fast_topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk(x, k, -1) (values best first, same values; among equal values the indices
    may differ), faster on CPU for small k: the top k entries lie in the k blocks with the
    largest maxima, so only those blocks are searched."""
    num_rows, vocab = x.shape
    if x.device.type != "cpu" or k > _FAST_TOPK_MAX_K or vocab % _BLOCK or vocab < 8 * _BLOCK * k or num_rows == 0:
        return torch.topk(x, k, dim=-1)
    block_max = x.unflatten(1, (vocab // _BLOCK, _BLOCK)).amax(dim=-1)
    blocks = torch.topk(block_max, k, dim=-1).indices
    cols = ((blocks * _BLOCK).unsqueeze(2) + torch.arange(_BLOCK, device=x.device)).flatten(1)
    values, inner = torch.topk(x.gather(1, cols), k, dim=-1)
    return values, cols.gather(1, inner)


def inverse_cdf_sample(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per row of the unnormalized probabilities [R, V] (>= 0, some > 0), the first token whose
    cumulative probability reaches u * total, for u [R] float64 in (0, 1]: token v is drawn with
    probability probs[v] / total, and a token with probability 0 never is.

    Two levels: float32 sums of blocks of _BLOCK tokens, their float64 cumsum -> the block ->
    a float64 cumsum inside that block only. Cheaper than a full-row cumsum, and more exact:
    each token's share is right to ~1e-7 of its own block's mass, where a float32 full-row
    cumsum would quantize every share to ~6e-8 absolute (the whole long tail). The result
    depends only on the row."""
    num_rows, vocab = probs.shape
    device = probs.device
    nb = vocab // _BLOCK
    if nb == 0:
        cdf = probs.cumsum(dim=-1, dtype=torch.float64)
        return torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1)).squeeze(1).clamp_(max=vocab - 1)
    block_sums = probs[:, : nb * _BLOCK].unflatten(1, (nb, _BLOCK)).sum(dim=-1)
    if nb * _BLOCK < vocab:
        block_sums = torch.cat([block_sums, probs[:, nb * _BLOCK :].sum(dim=-1, keepdim=True)], dim=1)
    block_cdf = block_sums.cumsum(dim=-1, dtype=torch.float64)
    target = (u * block_cdf[:, -1]).unsqueeze(1)
    # the first block whose cumulative mass reaches the target (it has mass > 0)
    block = torch.searchsorted(block_cdf, target).clamp_(max=block_cdf.shape[1] - 1)
    before = torch.where(block > 0, block_cdf.gather(1, (block - 1).clamp(min=0)), torch.zeros_like(target))
    rest = target - before  # > 0
    cols = block * _BLOCK + torch.arange(_BLOCK, device=device)
    in_range = cols < vocab  # only the last, partial block has columns past the end
    inner = probs.gather(1, cols.clamp(max=vocab - 1)).masked_fill_(~in_range, 0.0).cumsum(dim=-1, dtype=torch.float64)
    # the block's cumsum and its sum may differ in the last bits: never step past its mass
    rest = torch.minimum(rest, inner[:, -1:])
    pos = torch.searchsorted(inner, rest).clamp_(max=_BLOCK - 1)
    return cols.gather(1, pos).squeeze(1).clamp_(max=vocab - 1)


def apply_top_k_top_p(probs: torch.Tensor, ks: list[int], ps: list[float]) -> None:
    """In place on probabilities [M, V]: zero all but each row's top_k (0: no limit) most likely
    tokens, then all but the smallest set of the most likely remaining ones whose mass reaches
    top_p (1: no limit) of the remaining mass (vLLM's order and renormalization). Tokens tied
    with the last kept one are kept too, so the result depends only on the row."""
    num_rows, vocab = probs.shape
    device = probs.device
    ks = [min(k, vocab) if k > 0 else 0 for k in ks]
    max_k = max(ks, default=0)
    if all(p >= 1.0 for p in ps):  # top_k only
        if max_k == 0:
            return
        values = fast_topk(probs, max_k)[0]
        k = torch.tensor([min(k, vocab) if k > 0 else max_k for k in ks], dtype=torch.long, device=device)
        kth = values.gather(1, (k - 1).unsqueeze(1))
        if not all(k > 0 for k in ks):
            kth.masked_fill_(torch.tensor([k <= 0 for k in ks], device=device).unsqueeze(1), 0.0)
        probs.masked_fill_(probs < kth, 0.0)
        return

    # The nucleus is looked for among the K most likely tokens (K >= every top_k); rows whose
    # nucleus is not inside them (flat distributions) try a larger K, then a full sort. The cut
    # comes from prefix sums of the sorted probabilities, which do not depend on K.
    remaining = list(range(num_rows))
    kth_all = torch.zeros(num_rows, 1, dtype=probs.dtype, device=device)  # keep probs >= this
    tiers = [min(vocab, max(max_k, c)) for c in _TOP_P_CANDIDATES] + [vocab]
    for K in tiers:
        idx = index_tensor(remaining, device)
        rows = probs[idx]
        values = torch.topk(rows, K, dim=-1).values if K < vocab else rows.sort(dim=-1, descending=True).values
        rk = [ks[j] for j in remaining]
        rp = torch.tensor([ps[j] for j in remaining], dtype=torch.float64, device=device)
        has_k = torch.tensor([k > 0 for k in rk], device=device)
        kth = torch.zeros(len(remaining), 1, dtype=probs.dtype, device=device)
        if any(k > 0 for k in rk):
            k = torch.tensor([min(k, vocab) if k > 0 else 1 for k in rk], dtype=torch.long, device=device)
            kth = torch.where(has_k.unsqueeze(1), values.gather(1, (k - 1).unsqueeze(1)), kth)
            values = values.masked_fill(values < kth, 0.0)
        incl = values.cumsum(dim=-1, dtype=torch.float64)
        # the mass top_p applies to: what top_k kept, else the whole (softmax-normalized) row
        total = torch.where(has_k, incl[:, -1], torch.ones_like(rp))
        mass = rp * total
        # keep rank r while the mass of the ranks before it is < mass (the best token always)
        excl = torch.cat([torch.zeros_like(incl[:, :1]), incl[:, :-1]], dim=1)
        n_keep = (excl < mass.unsqueeze(1)).sum(dim=-1, keepdim=True).clamp_(min=1)
        cut = values.gather(1, n_keep - 1)
        cut = torch.where((rp < 1.0).unsqueeze(1), torch.maximum(cut, kth), kth)
        done = has_k | (rp >= 1.0) | (incl[:, -1] >= mass) | (K >= vocab)
        done_list = done.tolist()
        kth_all[idx[done]] = cut[done]
        remaining = [j for j, d in zip(remaining, done_list) if not d]
        if not remaining:
            break
    probs.masked_fill_(probs < kth_all, 0.0)
