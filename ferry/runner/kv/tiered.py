"""What the retrieval policies with a slow tier (`spans`, `shadow`) share: sinks and a local window stay in device
blocks, older blocks are host blocks (block table entry -1 - h) that a fast-tier index scores, and each query
attends to its resident blocks plus the top-k host blocks the scores pick.

A policy says how it scores host blocks (`TieredLayer.block_scores`: spans bounds q . k per channel, shadow uses
landmark keys) and how it reads a picked block's K/V (`TieredLayer.host_kv`: spans copies them from the host tier,
shadow rebuilds the keys from fast-tier low-rank coefficients). Everything else is here: decode queries of a step
read together (the reads are planned once per step for every layer), a prefill chunk with cold blocks picks the
host blocks with the most estimated attention mass over the whole chunk (so prompt scoring pays the loss too), the
first chunk and any chunk with nothing cold read their whole context exactly.
Legend: L layers, N device blocks, Nh host blocks, bs block size, K kv heads, G query heads per kv head, Dh head
dim, B decode requests with cold blocks, n host blocks.
"""
from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import Any

import torch

from ferry.models.layers.attention import AttnMetadata, LayerKV, PrefillChunk, prefill_attention, write_kv
from ferry.ops.paged_attention import available as paged_decode_attention_available, paged_decode_attention
from ferry.runner.kv.base import StorageKV, gather_blocks
from ferry.runner.kv.storage import BlockLayout


@dataclass
class TieredStep:
    """What every layer's decode queries read this step (TieredKV.begin_step)."""

    plain: list[int]  # decode rows with nothing cold: read through their block tables
    reads: DecodeReads | None  # the others'


@dataclass
class DecodeReads:
    """What the step's decode queries read, padded to a batch (the same in every layer but the picked blocks).
    Legend: nd / nh most resident blocks / host blocks among the B requests."""

    rows: torch.Tensor  # [B] their rows in the step
    device_ids: torch.Tensor  # [B, nd] resident blocks (padded with block 0)
    num_device_tokens: torch.Tensor  # [B] valid tokens in them (the partial last block is resident and last)
    host_ids: torch.Tensor  # [B, nh] host blocks (padded with 0)
    host_valid: torch.Tensor  # [B, nh] bool
    host_logical: torch.Tensor  # [B, nh] their block indices in each request (positions, tests and stats)
    top_k: torch.Tensor  # [B] host blocks each reads


class TieredLayer(LayerKV):
    def __init__(self, owner: TieredKV, layer: int) -> None:
        self.owner, self.layer = owner, layer
        self.k_cache, self.v_cache = owner.storage.layers[layer]  # [N, bs, K, Dh]

    # -- what a policy defines ----------------------------------------------------------------------

    @abstractmethod
    def block_scores(self, q: torch.Tensor, host_ids: torch.Tensor, valid: torch.Tensor, top_k: torch.Tensor,
                     scale: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """q [B, H, Dh], host_ids / valid [B, n], top_k [B] -> [B, n] estimated attention mass per host block (the
        top_k highest are read; invalid entries are masked by the caller), and [B, n] bool: blocks whose keys are
        read exactly if picked (None: the policy reads every key exactly)."""

    @abstractmethod
    def host_kv(self, host_ids: torch.Tensor, logical: torch.Tensor, exact: torch.Tensor | None,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Picked host blocks [B, k] (CPU), their block indices in the request and block_scores' exact flags
        [B, k] -> K, V [B, k * bs, K, Dh]."""

    def write(self, k: torch.Tensor, v: torch.Tensor, meta: AttnMetadata) -> None:
        """Store this step's k/v [T, K, Dh] at meta.slot_mapping (and whatever the policy derives from them)."""
        write_kv(k, v, self.k_cache, self.v_cache, meta.slot_mapping)

    # -- the shared flow ----------------------------------------------------------------------------

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttnMetadata, scale: float,
               window: int | None) -> torch.Tensor:
        self.write(k, v, meta)
        T, H, Dh = q.shape
        out = torch.empty(T, H, Dh, dtype=q.dtype, device=q.device)
        plain, reads = meta.kv_state.plain, meta.kv_state.reads
        if plain:  # nothing cold: full attention's batched decode kernel, or the gathered torch path
            idx = torch.tensor(plain, device=q.device)
            out[idx] = self._plain_decode(q[idx], meta.decode_block_tables[idx], meta.decode_ctx_lens[idx], window,
                                          scale).to(q.dtype)
        if reads is not None:
            out[reads.rows] = self._decode(q[reads.rows], reads, scale).to(q.dtype)
        for i, chunk in enumerate(meta.prefills):
            rows = slice(chunk.q_start, chunk.q_start + chunk.q_len)
            mask = meta.prefill_mask(i, window)
            if chunk.start_pos == 0:
                kc, vc = k[rows], v[rows]
            elif bool((chunk.block_ids >= 0).all()):  # nothing cold yet: the whole context, exactly
                ctx = chunk.start_pos + chunk.q_len
                kc, vc = (gather_blocks(c, chunk.block_ids)[:ctx] for c in (self.k_cache, self.v_cache))
            else:
                kc, vc, mask = self._prefill_kv(q[rows], chunk, scale)
            out[rows] = prefill_attention(q[rows], kc, vc, mask, scale).to(q.dtype)
        return out.view(T, H * Dh)

    def _prefill_kv(self, q: torch.Tensor, chunk: PrefillChunk,
                    scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A chunk's queries q [Q, H, Dh] read the resident blocks (sinks, window, the chunk itself) and the top-k
        host blocks for the chunk as a whole (the budget of one query at this context). Returns keys, values
        [C', K, Dh] and the [Q, C'] visibility mask (causal by position; host blocks are older than the chunk)."""
        bs = self.owner.block_size
        ctx = chunk.start_pos + chunk.q_len
        entries = chunk.block_ids[:-(-ctx // bs)]
        on_dev = entries >= 0
        logical = torch.arange(len(entries), device=entries.device)
        dev_blocks, host_blocks, host_logical = entries[on_dev], -1 - entries[~on_dev], logical[~on_dev]
        parts = [(gather_blocks(self.k_cache, dev_blocks), gather_blocks(self.v_cache, dev_blocks), logical[on_dev])]
        top_k = chunk.kv.num_host_reads  # the plan's: the budget minus sinks, window and this block
        if top_k:
            sel, exact = self._select(q, host_blocks, top_k, scale)
            kh, vh = self.host_kv(host_blocks[sel].cpu()[None], host_logical[sel][None],
                                  None if exact is None else exact[None], q.device)
            parts.append((kh[0], vh[0], host_logical[sel]))
        kc = torch.cat([p[0] for p in parts])
        vc = torch.cat([p[1] for p in parts])
        kpos = (torch.cat([p[2] for p in parts])[:, None] * bs + torch.arange(bs, device=q.device)).flatten()
        qpos = torch.arange(chunk.start_pos, ctx, device=q.device)
        return kc, vc, kpos[None, :] <= qpos[:, None]

    def _plain_decode(self, q: torch.Tensor, tables: torch.Tensor, ctx_lens: torch.Tensor, window: int | None,
                      scale: float) -> torch.Tensor:
        if q.device.type == "cpu" and paged_decode_attention_available():
            return paged_decode_attention(q, self.k_cache, self.v_cache, tables, ctx_lens, window, scale)
        kc, vc = gather_blocks(self.k_cache, tables), gather_blocks(self.v_cache, tables)  # [B, C, K, Dh]
        visible = torch.arange(kc.shape[1], device=q.device)[None, :] < ctx_lens[:, None]
        return attend_batch(q, kc, vc, visible, scale)

    def _decode(self, q: torch.Tensor, reads: DecodeReads, scale: float) -> torch.Tensor:
        """q [B, H, Dh] -> [B, H, Dh] over each request's resident blocks and its top-k host blocks."""
        B, bs = q.shape[0], self.owner.block_size
        mass, exact = self.block_scores(q, reads.host_ids, reads.host_valid, reads.top_k, scale)  # [B, nh]
        mass = mass.masked_fill(~reads.host_valid, -1.0)
        k_max = int(reads.top_k.max())
        top = mass.topk(k_max, dim=1)  # [B, k]
        chosen = (torch.arange(k_max, device=q.device)[None, :] < reads.top_k[:, None]) & (top.values >= 0)
        picked = reads.host_ids.gather(1, top.indices)  # [B, k]
        logical = reads.host_logical.gather(1, top.indices)
        if self.owner.record is not None:
            for b in range(B):
                self.owner.record.append((self.layer, sorted(logical[b][chosen[b]].tolist())))
        exact = None if exact is None else exact.gather(1, top.indices) & chosen
        kh, vh = self.host_kv(picked.cpu(), logical, exact, q.device)
        kc = torch.cat((gather_blocks(self.k_cache, reads.device_ids), kh), dim=1)  # [B, C', K, Dh]
        vc = torch.cat((gather_blocks(self.v_cache, reads.device_ids), vh), dim=1)
        nd = reads.device_ids.shape[1] * bs
        dev_visible = torch.arange(nd, device=q.device)[None, :] < reads.num_device_tokens[:, None]
        host_visible = chosen.repeat_interleave(bs, dim=1)
        return attend_batch(q, kc, vc, torch.cat((dev_visible, host_visible), dim=1), scale)

    def pick(self, q: torch.Tensor, host_ids: torch.Tensor, top_k: int, scale: float) -> torch.Tensor:
        """Indices into host_ids [n] of the top_k blocks for queries q [Q, H, Dh]: the chunk is scored as one query
        of Q*H heads (per head a softmax over the blocks estimates where its attention mass goes; blocks are ranked
        by that mass summed over queries and heads: one query reading a needle gives its block ~1)."""
        return self._select(q, host_ids, top_k, scale)[0]

    def _select(self, q: torch.Tensor, host_ids: torch.Tensor, top_k: int,
                scale: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """pick's indices [k], and block_scores' exact flags of the picked blocks [k] (or None)."""
        Q, H, Dh = q.shape
        K = self.k_cache.shape[2]
        as_heads = q.reshape(Q, K, H // K, Dh).transpose(0, 1).reshape(1, -1, Dh)
        k = min(top_k, len(host_ids))
        valid = torch.ones(1, len(host_ids), dtype=torch.bool, device=q.device)
        mass, exact = self.block_scores(as_heads, host_ids[None], valid, torch.tensor([k], device=q.device), scale)
        idx = mass[0].topk(k).indices
        return idx, None if exact is None else exact[0, idx]


def span_mass(q: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, H, Dh], per-block key bounds lo/hi [B, n, K, Dh] -> [B, n]: per head a softmax over the blocks' score
    bounds (where its attention mass would go), summed over heads. max(q_d lo_d, q_d hi_d) is q_d hi_d where
    q_d >= 0 and q_d lo_d elsewhere (hi >= lo), so the bound is two matmuls; lo = hi = a landmark key scores it."""
    B, _, K, Dh = lo.shape
    qg = q.float().view(B, K, -1, Dh)  # [B, K, G, Dh] (query heads of a kv head are adjacent)
    bound = torch.einsum("bkgd,bnkd->bkgn", qg.clamp(min=0), hi) + torch.einsum("bkgd,bnkd->bkgn", qg.clamp(max=0), lo)
    return torch.softmax(bound * scale, dim=-1).sum((1, 2))


def attend_batch(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, visible: torch.Tensor,
                 scale: float) -> torch.Tensor:
    """q [B, H, Dh], kc/vc [B, C, K, Dh], visible [B, C] bool -> float32 [B, H, Dh]."""
    B, H, Dh = q.shape
    K = kc.shape[2]
    qg = q.float().view(B, K, H // K, Dh)
    scores = torch.einsum("bkgd,bckd->bkgc", qg, kc.float()) * scale
    scores.masked_fill_(~visible[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("bkgc,bckd->bkgd", probs, vc.float()).reshape(B, H, Dh)


class TieredKV(StorageKV):
    """Plain K/V blocks in both tiers (KVStorage); a subclass adds its fast-tier index (declared by its policy,
    written in before_swap_out) and its layers."""

    def __init__(self, policy: Any, layout: BlockLayout) -> None:
        super().__init__(policy, layout)
        self.block_size = layout.block_size
        # (layer, picked host blocks as block indices of the request) per decode query, when a test asks
        self.record: list[tuple[int, list[int]]] | None = None

    def begin_step(self, meta: AttnMetadata) -> TieredStep:
        return TieredStep(*self.decode_reads(meta))

    def decode_reads(self, meta: AttnMetadata) -> tuple[list[int], DecodeReads | None]:
        """The step's decode rows with nothing cold, and what the others read."""
        bs, dev = self.block_size, meta.decode_block_tables.device
        plain, rows, device_ids, num_dev, host_ids, host_logical, top_k = [], [], [], [], [], [], []
        for b, (table, ctx) in enumerate(zip(meta.decode_block_tables.tolist(), meta.decode_ctx_lens.tolist())):
            entries = table[:-(-ctx // bs)]
            if all(e >= 0 for e in entries):
                plain.append(b)
                continue
            rows.append(b)
            device_ids.append([e for e in entries if e >= 0])
            num_dev.append(len(device_ids[-1]) * bs - (len(entries) * bs - ctx))  # the last block is resident
            host_ids.append([-1 - e for e in entries if e < 0])
            host_logical.append([i for i, e in enumerate(entries) if e < 0])
            top_k.append(meta.decode_kv[b].num_host_reads)  # the plan's: the budget minus resident blocks
        if not rows:
            return plain, None
        t = lambda x: torch.tensor(x, dtype=torch.long, device=dev)
        return plain, DecodeReads(t(rows), t(pad(device_ids)), t(num_dev), t(pad(host_ids)),
                                  t(pad([[1] * len(h) for h in host_ids])).bool(), t(pad(host_logical)), t(top_k))


def pad(rows: list[list[int]]) -> list[list[int]]:
    width = max(len(r) for r in rows)
    return [r + [0] * (width - len(r)) for r in rows]
