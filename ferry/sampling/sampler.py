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

The draw is inverse-CDF sampling with one uniform u ~ U(0, 1] per row: the first token whose
cumulative probability reaches u * total (see inverse_cdf_sample). A request with a seed draws
its u from its own torch.Generator (seeded from (seed, seed_offset), created on first use and
kept until release()), and every step of the pipeline is row-local, so its tokens do not depend
on the rest of the batch or on its row. Unseeded rows share one generator (one draw per step).
(vLLM draws B x V exponentials for an exponential race; on CPU that random draw costs ~10x the
rest of the sampler, one uniform per row does not, and the distribution is the same.)

Every stage runs only on the rows that need it, batched with tensor ops; an all-greedy batch
without penalties is one argmax (a blocked one on CPU, ~8x faster than torch.argmax there).
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch

from ferry.plan import ScheduledReq
from ferry.request import TokenLogprob
from ferry.sampling.penalties import apply_penalties
from ferry.sampling.primitives import apply_top_k_top_p, fast_argmax, fast_topk, index_tensor, inverse_cdf_sample

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

    def snapshot(self, req_ids: Iterable[str]) -> dict:
        """The random state these requests' next draws depend on (their seeded generators and the shared one),
        so that a step whose forward failed can be re-run with the same draws (restore)."""
        req_ids = list(req_ids)
        return {"shared": {d: g.get_state() for d, g in self._shared.items()},
                "reqs": {r: e[1].get_state() for r in req_ids if (e := self._generators.get(r)) is not None},
                "absent": [r for r in req_ids if r not in self._generators]}

    def restore(self, snap: dict, req_ids: Iterable[str]) -> None:
        """Back to the snapshot's state for these requests (and the shared generator), before re-running them."""
        for device in list(self._shared):
            if device in snap["shared"]:
                self._shared[device].set_state(snap["shared"][device])
            else:  # made by the failed try
                del self._shared[device]
        for rid in req_ids:
            if rid in snap["reqs"] and rid in self._generators:
                self._generators[rid][1].set_state(snap["reqs"][rid])
            elif rid in snap["absent"]:  # made by the failed try: made again, fresh, on first use
                self._generators.pop(rid, None)

    def keep_draws(self, snap: dict, req: ScheduledReq, num_kept: int) -> None:
        """A request sampled several rows in one step (verifying draft tokens) and keeps the first num_kept: its
        seeded generator goes back to `snap` and forward by num_kept draws, so its next token gets the draw it would
        have had without the discarded rows (each output token's uniform is its index in the request's stream)."""
        if req.params.seed is None or req.params.greedy or req.req_id not in self._generators:
            return
        device = self._generators[req.req_id][1].device
        if req.req_id in snap["absent"]:  # made by this step's draws: start it again
            del self._generators[req.req_id]
        else:
            self._generators[req.req_id][1].set_state(snap["reqs"][req.req_id])
        gen = self._request_generator(req, device)
        for _ in range(num_kept):  # one draw at a time, as _uniforms draws a seeded row's
            torch.rand(1, generator=gen, dtype=torch.float64, device=device)

    @property
    def num_generators(self) -> int:
        return len(self._generators)

    def _request_generator(self, req: ScheduledReq, device: torch.device) -> torch.Generator:
        key = (int(req.params.seed), int(req.seed_offset))  # type: ignore[arg-type]
        entry = self._generators.get(req.req_id)
        if entry is None or entry[0] != key or entry[1].device != device:
            gen = torch.Generator(device=device)
            gen.manual_seed(mix_seed(*key))
            # one draw per output token: a request resumed with tokens made elsewhere continues its stream there
            for _ in range(len(req.all_token_ids) - req.num_prompt_tokens):
                torch.rand(1, generator=gen, dtype=torch.float64, device=device)
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
            src = logits if len(logprob_rows) == num_rows else logits[index_tensor(logprob_rows, device)]
            raw_logprobs = torch.log_softmax(src, dim=-1)

        # From here on `logits` may be modified: take a private copy first (only if needed).
        if (min_tok_rows or penalty_rows) and not owned:
            logits, owned = logits.clone(), True
        if min_tok_rows:
            self._suppress_stop_tokens(logits, [reqs[i] for i in min_tok_rows], min_tok_rows, vocab)
        if penalty_rows:
            sub_idx = None if len(penalty_rows) == num_rows else index_tensor(penalty_rows, device)
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
            sub = logits if len(greedy_rows) == num_rows else logits[index_tensor(greedy_rows, device)]
            chosen = fast_argmax(sub)
            for i, t in zip(greedy_rows, chosen.tolist()):
                tokens[i] = t
        if random_rows:
            rreqs = [reqs[i] for i in random_rows]
            sub = logits if len(random_rows) == num_rows else logits[index_tensor(random_rows, device)]
            for i, t in zip(random_rows, self._sample(sub, rreqs).tolist()):
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
            logits[index_tensor(row_idx, logits.device), index_tensor(col_idx, logits.device)] = float("-inf")

    def _sample(self, logits: torch.Tensor, reqs: list[ScheduledReq]) -> torch.Tensor:
        """logits [R, V] of the non-greedy rows (not modified) -> token ids [R]."""
        num_rows, vocab = logits.shape
        device = logits.device
        temps = [float(r.params.temperature) for r in reqs]
        if any(t != 1.0 for t in temps):
            logits = logits / torch.tensor(temps, dtype=logits.dtype, device=device).unsqueeze(1)
        probs = torch.softmax(logits, dim=-1)  # a new tensor: everything below works in place on it

        # top_k / top_p on the rows that have them (masked tokens get probability 0)
        kp_rows = [j for j, r in enumerate(reqs) if (0 < r.params.top_k < vocab) or r.params.top_p < 1.0]
        if kp_rows:
            idx = None if len(kp_rows) == num_rows else index_tensor(kp_rows, device)
            sub = probs if idx is None else probs[idx]
            ks = [reqs[j].params.top_k if 0 < reqs[j].params.top_k < vocab else 0 for j in kp_rows]
            ps = [float(reqs[j].params.top_p) for j in kp_rows]
            apply_top_k_top_p(sub, ks, ps)
            if idx is not None:
                probs[idx] = sub

        # min_p: relative to the most likely token, which top_k / top_p always keep. (vLLM
        # compares renormalized probabilities; the ratio to the max is the same.)
        minp_rows = [j for j, r in enumerate(reqs) if r.params.min_p > 0.0]
        if minp_rows:
            idx = None if len(minp_rows) == num_rows else index_tensor(minp_rows, device)
            sub = probs if idx is None else probs[idx]
            min_p = torch.tensor([float(reqs[j].params.min_p) for j in minp_rows], dtype=probs.dtype, device=device)
            sub.masked_fill_(sub < sub.amax(dim=-1, keepdim=True) * min_p.unsqueeze(1), 0.0)
            if idx is not None:
                probs[idx] = sub

        return inverse_cdf_sample(probs, self._uniforms(reqs, device))

    def _uniforms(self, reqs: list[ScheduledReq], device: torch.device) -> torch.Tensor:
        """One U(0, 1] float64 per row. A seeded row draws from its own generator, so its value
        does not depend on the batch; the others share one generator and one draw."""
        unseeded = [j for j, r in enumerate(reqs) if r.params.seed is None]
        kw = dict(dtype=torch.float64, device=device)
        if len(unseeded) == len(reqs):
            u = torch.rand(len(reqs), generator=self._shared_generator(device), **kw)
        else:
            u = torch.empty(len(reqs), **kw)
            if unseeded:
                u[index_tensor(unseeded, device)] = torch.rand(len(unseeded), generator=self._shared_generator(device), **kw)
            for j, r in enumerate(reqs):
                if r.params.seed is not None:
                    u[j : j + 1] = torch.rand(1, generator=self._request_generator(r, device), **kw)
        return u.neg_().add_(1.0)  # [0, 1) -> (0, 1]

    @staticmethod
    def _fill_logprobs(
        raw: torch.Tensor,
        rows: list[int],
        reqs: Sequence[ScheduledReq],
        tokens: list[int],
        out: list[TokenLogprob | None],
    ) -> None:
        device = raw.device
        sampled = index_tensor([tokens[i] for i in rows], device)
        sampled_lp = raw.gather(1, sampled.unsqueeze(1)).squeeze(1).tolist()
        ns = [int(reqs[i].params.logprobs) for i in rows]  # type: ignore[arg-type]
        max_n = min(max(ns), raw.shape[1])
        top_ids: list[list[int]] = [[] for _ in rows]
        top_lps: list[list[float]] = [[] for _ in rows]
        if max_n > 0:
            values, indices = fast_topk(raw, max_n)
            top_ids, top_lps = indices.tolist(), values.tolist()
        for j, i in enumerate(rows):
            n = ns[j]
            out[i] = TokenLogprob(
                token_id=tokens[i],
                logprob=sampled_lp[j],
                top=list(zip(top_ids[j][:n], top_lps[j][:n])),
            )
