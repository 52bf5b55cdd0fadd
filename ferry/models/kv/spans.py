"""`spans`: resident blocks (sinks, local window) plus the top-k host spans picked through a min/max key index.

A block that goes cold (ferry/kvcache/policies/spans.py says which) is copied to a host block by the runner's
swap_out; that copy also writes its index entry: the per-channel min and max of its keys, per layer and kv head
(Quest). A decode query bounds its score on each host span by sum_d max(q_d min_d, q_d max_d) >= q . k for every
key k in it, estimates its attention mass per span by a softmax over those bounds (summed over heads), and reads
the top-k spans from the host tier together with its resident blocks; all decode queries of a step at once. A prefill chunk does the same for all its queries at once (the spans with the
most estimated attention mass over the chunk), so prompt scoring (perplexity) pays the loss too; the first chunk
and any chunk with nothing cold yet read their whole context exactly.
Legend: L layers, N device blocks, Nh host blocks, bs block size, K kv heads, G query heads per kv head, Dh head
dim, n spans.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ferry.config import ModelConfig
from ferry.kvcache.policies.spans import SpansPolicy
from ferry.kvcache.storage import KVStorage
from ferry.models.kv.base import LayerKV, PolicyKV, gather_blocks
from ferry.models.layers.attention import AttnMetadata, write_kv
from ferry.ops.attention import paged_decode_attention, paged_decode_attention_available


@dataclass
class _DecodeReads:
    """What the step's decode queries read, padded to a batch (the same in every layer but the picked spans).
    Legend: B decode requests with cold spans, nd / nh most resident blocks / cold spans among them."""

    rows: torch.Tensor  # [B] their rows in the step
    device_ids: torch.Tensor  # [B, nd] resident blocks (padded with block 0)
    num_device_tokens: torch.Tensor  # [B] valid tokens in them (the partial last block is resident and last)
    host_ids: torch.Tensor  # [B, nh] host blocks of the cold spans (padded with 0)
    host_valid: torch.Tensor  # [B, nh] bool
    host_logical: list[list[int]]  # their block indices in each request (for tests and stats)
    top_k: torch.Tensor  # [B] spans each reads


class SpansLayer(LayerKV):
    def __init__(self, owner: "SpansKV", layer: int) -> None:
        self.owner, self.layer = owner, layer
        self.k_cache, self.v_cache = owner.storage.layers[layer]  # [N, bs, K, Dh]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttnMetadata, scale: float,
               window: int | None) -> torch.Tensor:
        write_kv(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
        T, H, Dh = q.shape
        out = torch.empty(T, H, Dh, dtype=q.dtype, device=q.device)
        plain, reads = self.owner.decode_reads(meta)
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
            o = F.scaled_dot_product_attention(
                q[rows].float().transpose(0, 1)[None], kc.float().transpose(0, 1)[None],
                vc.float().transpose(0, 1)[None], attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=True)
            out[rows] = o[0].transpose(0, 1).to(q.dtype)
        return out.view(T, H * Dh)

    def _prefill_kv(self, q: torch.Tensor, chunk, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A chunk's queries q [Q, H, Dh] read the resident blocks (sinks, window, the chunk itself) and the top-k
        host spans for the chunk as a whole (the budget of one query at this context). Returns keys, values
        [C', K, Dh] and the [Q, C'] visibility mask (causal by position; host spans are older than the chunk)."""
        bs, policy = self.owner.block_size, self.owner.policy
        ctx = chunk.start_pos + chunk.q_len
        entries = chunk.block_ids[:-(-ctx // bs)]
        on_dev = entries >= 0
        logical = torch.arange(len(entries), device=entries.device)
        dev_blocks, host_blocks, host_logical = entries[on_dev], -1 - entries[~on_dev], logical[~on_dev]
        parts = [(gather_blocks(self.k_cache, dev_blocks), gather_blocks(self.v_cache, dev_blocks), logical[on_dev])]
        top_k = policy.top_k(ctx, policy.sink_blocks + policy.window_blocks + 1)
        if top_k:
            sel = self.pick(q, host_blocks, top_k, scale)
            picked = host_blocks[sel].cpu()
            host = self.owner.storage.host
            parts.append((gather_blocks(host[self.layer, 0], picked).to(q.device),
                          gather_blocks(host[self.layer, 1], picked).to(q.device), host_logical[sel]))
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

    def _decode(self, q: torch.Tensor, reads: _DecodeReads, scale: float) -> torch.Tensor:
        """q [B, H, Dh] -> [B, H, Dh] over each request's resident blocks and its top-k host spans."""
        B, bs = q.shape[0], self.k_cache.shape[1]
        index = self.owner.index[self.layer]
        lo, hi = index[0, reads.host_ids].float(), index[1, reads.host_ids].float()  # [B, nh, K, Dh]
        mass = span_mass(q, lo, hi, scale)  # [B, nh]
        mass.masked_fill_(~reads.host_valid, -1.0)
        k_max = int(reads.top_k.max())
        top = mass.topk(k_max, dim=1)  # [B, k]
        chosen = (torch.arange(k_max, device=q.device)[None, :] < reads.top_k[:, None]) & (top.values >= 0)
        picked = reads.host_ids.gather(1, top.indices)  # [B, k]
        if self.owner.record is not None:
            for b in range(B):
                sel = top.indices[b][chosen[b]].tolist()
                self.owner.record.append((self.layer, sorted(reads.host_logical[b][i] for i in sel)))
        host = self.owner.storage.host
        kc = torch.cat((gather_blocks(self.k_cache, reads.device_ids),
                        gather_blocks(host[self.layer, 0], picked.cpu()).to(q.device)), dim=1)  # [B, C', K, Dh]
        vc = torch.cat((gather_blocks(self.v_cache, reads.device_ids),
                        gather_blocks(host[self.layer, 1], picked.cpu()).to(q.device)), dim=1)
        nd = reads.device_ids.shape[1] * bs
        dev_visible = torch.arange(nd, device=q.device)[None, :] < reads.num_device_tokens[:, None]
        host_visible = chosen.repeat_interleave(bs, dim=1)
        return attend_batch(q, kc, vc, torch.cat((dev_visible, host_visible), dim=1), scale)

    def pick(self, q: torch.Tensor, host_ids: torch.Tensor, top_k: int, scale: float) -> torch.Tensor:
        """Indices into host_ids of the top_k spans for queries q [Q, H, Dh]: per query and head, a softmax over
        the spans' score bounds estimates where its attention mass goes; spans are ranked by that mass summed
        over queries and heads (one query reading a needle gives its span ~1, whatever the others do)."""
        index = self.owner.index[self.layer]
        lo, hi = index[0, host_ids].float(), index[1, host_ids].float()  # [n, K, Dh]
        Q, H, Dh = q.shape
        K = lo.shape[1]
        as_heads = q.reshape(Q, K, H // K, Dh).transpose(0, 1).reshape(1, -1, Dh)  # the chunk as one query of Q*H heads
        mass = span_mass(as_heads, lo[None], hi[None], scale)[0]
        return mass.topk(min(top_k, len(host_ids))).indices


def span_mass(q: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, H, Dh], span key bounds lo/hi [B, n, K, Dh] -> [B, n]: per head a softmax over the spans' score bounds
    (where its attention mass would go), summed over heads. max(q_d lo_d, q_d hi_d) is q_d hi_d where q_d >= 0 and
    q_d lo_d elsewhere (hi >= lo), so the bound is two matmuls."""
    B, n, K, Dh = lo.shape
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


class SpansKV(PolicyKV):
    def __init__(self, policy: SpansPolicy, cfg: ModelConfig, num_blocks: int, num_host_blocks: int,
                 block_size: int, dtype: torch.dtype, device: torch.device) -> None:
        self.policy = policy
        self.block_size = block_size
        self.storage = KVStorage(cfg, num_blocks, num_host_blocks, block_size, dtype, device)
        # [L, 2, Nh, K, Dh]: per host block and layer, the min (0) and max (1) of its keys per channel
        self.index = torch.zeros(cfg.num_layers, 2, num_host_blocks, cfg.num_kv_heads, cfg.head_dim,
                                 dtype=dtype, device=device)
        self.layers = [SpansLayer(self, l) for l in range(cfg.num_layers)]
        # (layer, picked spans as block indices of the request) per decode query, when a test asks
        self.record: list[tuple[int, list[int]]] | None = None

    @property
    def nbytes(self) -> int:
        return self.storage.nbytes + self.index.numel() * self.index.element_size()

    @property
    def host_nbytes(self) -> int:
        h = self.storage.host
        return 0 if h is None else h.numel() * h.element_size()

    def swap_out(self, pairs: list[tuple[int, int]]) -> None:
        if pairs:
            dev, host = (torch.tensor(x) for x in zip(*pairs))
            keys = self.storage.kv[:, 0, dev.to(self.storage.kv.device)]  # [L, n, bs, K, Dh], exact in the KV dtype
            self.index[:, 0, host] = keys.amin(dim=2)
            self.index[:, 1, host] = keys.amax(dim=2)
        self.storage.swap_out(pairs)

    def swap_in(self, pairs: list[tuple[int, int]]) -> None:
        self.storage.swap_in(pairs)

    def decode_reads(self, meta: AttnMetadata) -> tuple[list[int], _DecodeReads | None]:
        """The step's decode rows with nothing cold, and what the others read (built once per step)."""
        if "spans" not in meta.policy_state:
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
                top_k.append(self.policy.top_k(ctx, len(device_ids[-1])))
            reads = None
            if rows:
                t = lambda x: torch.tensor(x, dtype=torch.long, device=dev)
                reads = _DecodeReads(t(rows), t(_pad(device_ids)), t(num_dev), t(_pad(host_ids)),
                                     t(_pad([[1] * len(h) for h in host_ids])).bool(), host_logical, t(top_k))
            meta.policy_state["spans"] = (plain, reads)
        return meta.policy_state["spans"]


def _pad(rows: list[list[int]]) -> list[list[int]]:
    width = max(len(r) for r in rows)
    return [r + [0] * (width - len(r)) for r in rows]
