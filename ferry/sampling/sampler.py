"""The sampler: logits [B, V] of the rows that sample this step -> one token id per row (+ logprobs).

Per row, in vLLM's order:
  1. min_tokens: while the output is shorter than min_tokens, the request's stop_token_ids and
     (unless ignore_eos) the eos ids get -inf.
  2. repetition_penalty (prompt + output), then frequency/presence penalties (output only);
     see penalties.py.
  3. greedy rows (temperature < 1e-5): argmax. Other rows: logits / temperature -> top_k ->
     top_p -> min_p -> draw.
Logprobs (when params.logprobs is not None) are the log_softmax of the raw logits passed in,
before any of the above (vLLM's default "raw logprobs").

The draw is an exponential race: token = argmax(probs / E) with E_v ~ Exp(1) i.i.d., which picks
v with probability probs[v]. A request with a seed draws its E from its own torch.Generator
(seeded from (seed, seed_offset), kept until release()), so its tokens do not depend on the rest
of the batch or its row. Unseeded rows share one generator.

Every stage runs only on the rows that need it, batched with tensor ops; an all-greedy batch
without penalties is a bare argmax.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch

from ferry.plan import ScheduledReq
from ferry.request import TokenLogprob
from ferry.sampling.penalties import apply_penalties

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix_seed(seed: int, seed_offset: int) -> int:
    """The 64-bit generator seed of a request's (seed, seed_offset): distinct offsets give
    unrelated streams, and (s, 1) does not collide with (s + 1, 0)."""
    return _splitmix64(_splitmix64(seed & _MASK64) ^ (seed_offset & _MASK64))


class Sampler:
    def __init__(self, eos_token_ids: Iterable[int], *, seed: int | None = None):
        """eos_token_ids: suppressed until min_tokens is reached (unless ignore_eos).
        seed: seeds the generator shared by the unseeded rows (None: nondeterministic)."""
        self.eos_token_ids = sorted({int(t) for t in eos_token_ids})
        self._shared_seed = seed
        self._shared: dict[torch.device, torch.Generator] = {}
        # req_id -> ((seed, seed_offset), generator)
        self._generators: dict[str, tuple[tuple[int, int], torch.Generator]] = {}

    # --- per-request state -------------------------------------------------------------------

    def release(self, req_ids: Iterable[str]) -> None:
        """Drop per-request state (seeded generators) of finished / aborted requests."""
        for rid in req_ids:
            self._generators.pop(rid, None)

    @property
    def num_generators(self) -> int:
        return len(self._generators)

    def _request_generator(self, req: ScheduledReq, device: torch.device) -> torch.Generator:
        key = (int(req.params.seed), int(req.seed_offset))  # type: ignore[arg-type]
        entry = self._generators.get(req.req_id)
        if entry is None or entry[0] != key or entry[1].device != device:
            gen = torch.Generator(device=device)
            gen.manual_seed(mix_seed(*key))
            entry = (key, gen)
            self._generators[req.req_id] = entry
        return entry[1]

    def _shared_generator(self, device: torch.device) -> torch.Generator:
        gen = self._shared.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            if self._shared_seed is None:
                gen.seed()
            else:
                gen.manual_seed(self._shared_seed & _MASK64)
            self._shared[device] = gen
        return gen

    # --- sampling ----------------------------------------------------------------------------

    def __call__(
        self, logits: torch.Tensor, reqs: Sequence[ScheduledReq]
    ) -> tuple[list[int], list[TokenLogprob | None]]:
        if logits.dim() != 2 or logits.shape[0] != len(reqs):
            raise ValueError(f"logits must be [len(reqs)={len(reqs)}, V], got {tuple(logits.shape)}")
        num_rows, vocab = logits.shape
        if num_rows == 0:
            return [], []
        owned = False  # True once `logits` is a private copy we may modify in place
        if logits.dtype != torch.float32:
            logits, owned = logits.float(), True
        device = logits.device

        # Classify the rows (one Python pass over the requests, nothing per vocab entry).
        greedy_rows: list[int] = []
        random_rows: list[int] = []
        logprob_rows: list[int] = []
        min_tok_rows: list[int] = []
        penalty_rows: list[int] = []
        for i, r in enumerate(reqs):
            p = r.params
            (greedy_rows if p.greedy else random_rows).append(i)
            if p.logprobs is not None:
                logprob_rows.append(i)
            if p.min_tokens and len(r.all_token_ids) - r.num_prompt_tokens < p.min_tokens:
                min_tok_rows.append(i)
            if p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0:
                penalty_rows.append(i)

        # Raw logprobs, before anything touches the logits.
        raw_logprobs = None
        if logprob_rows:
            src = logits if len(logprob_rows) == num_rows else logits[_index(logprob_rows, device)]
            raw_logprobs = torch.log_softmax(src, dim=-1)

        # From here on `logits` may be modified: take a private copy first (only if needed).
        if (min_tok_rows or penalty_rows) and not owned:
            logits, owned = logits.clone(), True
        if min_tok_rows:
            self._suppress_stop_tokens(logits, [reqs[i] for i in min_tok_rows], min_tok_rows, vocab)
        if penalty_rows:
            sub_idx = None if len(penalty_rows) == num_rows else _index(penalty_rows, device)
            sub = logits if sub_idx is None else logits[sub_idx]
            preqs = [reqs[i] for i in penalty_rows]
            apply_penalties(
                sub,
                [r.all_token_ids for r in preqs],
                [r.num_prompt_tokens for r in preqs],
                [float(r.params.repetition_penalty) for r in preqs],
                [float(r.params.presence_penalty) for r in preqs],
                [float(r.params.frequency_penalty) for r in preqs],
            )
            if sub_idx is not None:
                logits[sub_idx] = sub

        tokens = [0] * num_rows
        if greedy_rows:
            if len(greedy_rows) == num_rows:
                chosen = logits.argmax(dim=-1)
            else:
                chosen = logits[_index(greedy_rows, device)].argmax(dim=-1)
            for i, t in zip(greedy_rows, chosen.tolist()):
                tokens[i] = t
        if random_rows:
            rreqs = [reqs[i] for i in random_rows]
            if len(random_rows) < num_rows:
                sub, sub_owned = logits[_index(random_rows, device)], True  # a gather copies
            else:
                sub, sub_owned = logits, owned
            for i, t in zip(random_rows, self._sample(sub, rreqs, sub_owned).tolist()):
                tokens[i] = t

        logprobs: list[TokenLogprob | None] = [None] * num_rows
        if raw_logprobs is not None:
            self._fill_logprobs(raw_logprobs, logprob_rows, reqs, tokens, logprobs)
        return tokens, logprobs

    def _suppress_stop_tokens(
        self, logits: torch.Tensor, reqs: list[ScheduledReq], rows: list[int], vocab: int
    ) -> None:
        row_idx: list[int] = []
        col_idx: list[int] = []
        for row, r in zip(rows, reqs):
            ids = set(r.params.stop_token_ids)
            if not r.params.ignore_eos:
                ids.update(self.eos_token_ids)
            for t in ids:
                if 0 <= t < vocab:
                    row_idx.append(row)
                    col_idx.append(t)
        if row_idx:
            logits[_index(row_idx, logits.device), _index(col_idx, logits.device)] = float("-inf")

    def _sample(self, logits: torch.Tensor, reqs: list[ScheduledReq], owned: bool) -> torch.Tensor:
        """logits: [R, V] of the non-greedy rows -> token ids [R]. Modifies `logits` in place
        only if `owned`."""
        num_rows, vocab = logits.shape
        device = logits.device
        temps = [float(r.params.temperature) for r in reqs]
        if any(t != 1.0 for t in temps):
            temp = torch.tensor(temps, dtype=logits.dtype, device=device).unsqueeze(1)
            if owned:
                logits.div_(temp)
            else:
                logits, owned = logits / temp, True

        # top_k / top_p on the rows that have them
        kp_rows = [j for j, r in enumerate(reqs) if (0 < r.params.top_k < vocab) or r.params.top_p < 1.0]
        if kp_rows:
            if not owned:
                logits, owned = logits.clone(), True
            idx = None if len(kp_rows) == num_rows else _index(kp_rows, device)
            sub = logits if idx is None else logits[idx]
            ks = [reqs[j].params.top_k if 0 < reqs[j].params.top_k < vocab else 0 for j in kp_rows]
            ps = [float(reqs[j].params.top_p) for j in kp_rows]
            _apply_top_k_top_p(sub, ks, ps)
            if idx is not None:
                logits[idx] = sub

        probs = None
        minp_rows = [j for j, r in enumerate(reqs) if r.params.min_p > 0.0]
        if minp_rows:
            # the softmax computed here is reused for the draw (masked entries -> 0 prob)
            probs = torch.softmax(logits, dim=-1)
            idx = None if len(minp_rows) == num_rows else _index(minp_rows, device)
            min_p = torch.tensor([float(reqs[j].params.min_p) for j in minp_rows], dtype=probs.dtype, device=device)
            sub = probs if idx is None else probs[idx]
            threshold = sub.amax(dim=-1, keepdim=True) * min_p.unsqueeze(1)
            sub.masked_fill_(sub < threshold, 0.0)
            if idx is not None:
                probs[idx] = sub
        if probs is None:
            probs = torch.softmax(logits, dim=-1)

        # Exponential race: argmax(probs / E), E ~ Exp(1). Seeded rows draw from their own
        # generator, one row at a time, so their noise never depends on the batch.
        noise = torch.empty_like(probs)
        unseeded = [j for j, r in enumerate(reqs) if r.params.seed is None]
        if len(unseeded) == num_rows:
            noise.exponential_(generator=self._shared_generator(device))
        else:
            if unseeded:
                block = torch.empty(len(unseeded), vocab, dtype=probs.dtype, device=device)
                block.exponential_(generator=self._shared_generator(device))
                noise[_index(unseeded, device)] = block
            for j, r in enumerate(reqs):
                if r.params.seed is not None:
                    noise[j].exponential_(generator=self._request_generator(r, device))
        # guard against an exact 0 draw (0/0 = nan would win the argmax)
        noise.clamp_min_(torch.finfo(noise.dtype).tiny)
        return probs.div_(noise).argmax(dim=-1)

    @staticmethod
    def _fill_logprobs(
        raw: torch.Tensor,
        rows: list[int],
        reqs: Sequence[ScheduledReq],
        tokens: list[int],
        out: list[TokenLogprob | None],
    ) -> None:
        device = raw.device
        sampled = _index([tokens[i] for i in rows], device)
        sampled_lp = raw.gather(1, sampled.unsqueeze(1)).squeeze(1).tolist()
        ns = [int(reqs[i].params.logprobs) for i in rows]  # type: ignore[arg-type]
        max_n = min(max(ns), raw.shape[1])
        top_ids: list[list[int]] = [[] for _ in rows]
        top_lps: list[list[float]] = [[] for _ in rows]
        if max_n > 0:
            values, indices = torch.topk(raw, max_n, dim=-1)
            top_ids, top_lps = indices.tolist(), values.tolist()
        for j, i in enumerate(rows):
            n = ns[j]
            out[i] = TokenLogprob(
                token_id=tokens[i],
                logprob=sampled_lp[j],
                top=list(zip(top_ids[j][:n], top_lps[j][:n])),
            )


def _index(values: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long, device=device)


def _apply_top_k_top_p(logits: torch.Tensor, ks: list[int], ps: list[float]) -> None:
    """In place on [M, V]: keep each row's top_k (0: all) logits, then the smallest set of the
    most likely tokens whose probability reaches top_p (1: all). Others get -inf. Ties with the
    k-th value are kept, as in vLLM."""
    device = logits.device
    vocab = logits.shape[1]
    any_k = any(k > 0 for k in ks)
    any_p = any(p < 1.0 for p in ps)
    if not any_p:
        # top_k only: a partial topk is much cheaper than a full sort
        max_k = min(max(ks), vocab)
        k = torch.tensor([min(k, vocab) if k > 0 else max_k for k in ks], dtype=torch.long, device=device)
        kth = torch.topk(logits, max_k, dim=-1).values.gather(1, (k - 1).unsqueeze(1))
        if not all(k > 0 for k in ks):  # rows without a top_k keep everything
            no_k = torch.tensor([k <= 0 for k in ks], device=device).unsqueeze(1)
            kth = kth.masked_fill(no_k, float("-inf"))
        logits.masked_fill_(logits < kth, float("-inf"))
        return
    # vLLM's sort-based top_k + top_p (ascending sort)
    sorted_logits, order = logits.sort(dim=-1, descending=False)
    if any_k:
        k = torch.tensor([min(k, vocab) if k > 0 else vocab for k in ks], dtype=torch.long, device=device)
        kth = sorted_logits.gather(1, (vocab - k).unsqueeze(1))
        sorted_logits.masked_fill_(sorted_logits < kth, float("-inf"))
    p = torch.tensor(ps, dtype=logits.dtype, device=device).unsqueeze(1)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    mask = (cum <= 1 - p) & (p < 1.0)
    mask[:, -1] = False  # always keep the most likely token
    sorted_logits.masked_fill_(mask, float("-inf"))
    logits.scatter_(1, order, sorted_logits)
