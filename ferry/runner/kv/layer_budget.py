"""`layer-budget` (PrefixKV) over any base storage whose layers can be written and read back densely (full, int8,
merge): per-layer keep sets from one global prefix configuration, applied as read masks.

Importance: importance [L, N, bs] float32 per (layer, slot) accumulates the attention each token receives (summed
over heads): from every decode query, and from the last OBS queries of every prefill chunk (the full
[Q, C] probabilities of a long chunk would cost as much as the attention itself). A slot's importance is zeroed
when a token is written there; it lives with the block (swapped with it, and shared with a prefix-cached block,
whose sharers then rank its tokens by their summed attention).
Keep sets: once per step (before layer 0 writes), for every decode request, from the importance of the context
before the step (max-pooled over POOL neighbours, so a span's tokens rank together): sinks and the recent window
are kept, and each layer keeps the top n_l of the rest, n_l from
`prefix_counts` (the binary search over the global p). A decode query reads its layer's kept tokens and itself.
Prefill reads everything, as PrefixKV compresses after the prompt: evicting at chunk boundaries would drop what
only the prompt's end (the question) attends to — a passkey, say — before that end is seen. So prompt scoring
(perplexity) is full attention's; the loss is in what is generated.
Compaction (over `full`, see ferry/kvcache/policies/layer_budget.py): at the single-token step the plan says
(KVStep.compaction; before layer 0 writes), the keep sets of its region (whole blocks before the step) are taken
once more, for the region's share of the budget the plan gives, and every kept (layer, token) cell is copied into the region's first blocks, layer
after layer, filling all L planes of a block before the next; tags [L, N, bs] uint8 record which layer's token
each region cell holds (only a compacted region's tags are read). From then on, that request's decode queries
read, at layer l, the region cells tagged l and the tail (tokens from the first block after the HOLEs on) in
place; its keep sets are fixed, as PrefixKV's.
Legend: L layers, N blocks, bs block size, B decode requests, C context, P tokens before the step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ferry.models.layers.attention import AttnMetadata, LayerKV, write_kv
from ferry.plan import HOLE, Compaction, StepPlan
from ferry.runner.kv.base import POLICY_KV, PolicyKV, gather_blocks, register_policy_kv
from ferry.models.layers.attention import prefill_attention
from ferry.runner.kv.dense import decode_probs, weighted_values
from ferry.runner.kv.full import FullKV, PagedLayer
from ferry.runner.kv.int8 import Int8Layer
from ferry.runner.kv.merge import MergeLayer
from ferry.runner.kv.storage import BlockLayout

OBS = 32  # prefill queries per chunk (its last ones) whose attention adds to the importance
POOL = 7  # tokens ranked together: each by the largest importance within POOL // 2 of it
EMPTY = 255  # the owner tag of a region cell that holds no kept token (others hold their layer's id)


def prefix_counts(importance: torch.Tensor, budget: int, iters: int = 40) -> torch.Tensor:
    """importance [L, C] >= 0 -> [L] long: per layer, the fewest top tokens whose share of the layer's importance
    reaches p, for the largest p (binary search) at which all layers together keep at most `budget` tokens."""
    L, C = importance.shape
    if budget >= L * C:
        return torch.full((L,), C, dtype=torch.long)
    mass = importance.float().clamp_min(0).sort(dim=1, descending=True).values
    total = mass.sum(1, keepdim=True)
    flat = torch.arange(1, C + 1, dtype=torch.float32) / C  # a layer with no importance yet: uniform
    cum = torch.where(total > 0, mass.cumsum(1) / total.clamp_min(1e-30), flat)  # [L, C], non-decreasing to 1

    def counts(p: float) -> torch.Tensor:
        return (torch.searchsorted(cum, torch.full((L, 1), p)) + 1).clamp(max=C)[:, 0]

    if int(counts(0.0).sum()) > budget:  # fewer than one token per layer: share what there is evenly
        return torch.full((L,), budget // L, dtype=torch.long)
    lo, hi = 0.0, 1.0
    for _ in range(iters):
        mid = (lo + hi) / 2
        if int(counts(mid).sum()) <= budget:
            lo = mid
        else:
            hi = mid
    return counts(lo)


def keep_mask(importance: torch.Tensor, budget: int, sink: int, window: int) -> torch.Tensor:
    """importance [L, P] -> bool [L, P]: sinks and window kept in every layer, then each layer's prefix of the
    rest (prefix_counts) with the L * budget total."""
    L, P = importance.shape
    if budget >= P:
        return torch.ones(L, P, dtype=torch.bool, device=importance.device)
    forced = torch.zeros(P, dtype=torch.bool, device=importance.device)
    forced[:sink] = True
    forced[max(0, P - window):] = True
    keep = forced[None, :].repeat(L, 1)
    rest = (~forced).nonzero()[:, 0]
    avail = L * (budget - int(forced.sum()))
    if len(rest) == 0 or avail <= 0:
        return keep
    sub = importance[:, rest].cpu()
    n = prefix_counts(sub, avail)
    rank = torch.empty_like(sub, dtype=torch.long)
    rank.scatter_(1, sub.argsort(dim=1, descending=True), torch.arange(len(rest)).expand(L, -1).contiguous())
    keep[:, rest] = (rank < n[:, None]).to(keep.device)
    return keep


@dataclass
class _StepKeep:
    """What every layer's decode queries read this step (built once, before layer 0 writes)."""

    plain: torch.Tensor  # [B'] long: decode rows read through their block tables (not compacted)
    decode_masks: torch.Tensor | None  # [L, B', 1, 1, C] additive: 0 kept (or this step's token), -inf evicted
    packed: _Packed | None  # the compacted rows


@dataclass
class _Packed:
    """Compacted decode rows and, per layer, the cells each reads: its region cells, then its tail."""

    rows: torch.Tensor  # [Bp] long
    planes: torch.Tensor  # [L, Bp, Cp] long: the plane (layer slice of the storage) of each cell read
    cells: torch.Tensor  # [L, Bp, Cp] long: block * bs + slot
    masks: torch.Tensor  # [L, Bp, 1, 1, Cp] additive: -inf past a row's cells


def dense_io(layer: LayerKV):
    """(write(k, v, slots), read(block_ids) -> float32 K, V) of a base layer."""
    if isinstance(layer, PagedLayer):
        return (lambda k, v, s: write_kv(k, v, layer.k_cache, layer.v_cache, s),
                lambda ids: (gather_blocks(layer.k_cache, ids).float(), gather_blocks(layer.v_cache, ids).float()))
    if isinstance(layer, Int8Layer):
        return layer._write, lambda ids: (layer._read(0, ids), layer._read(1, ids))
    if isinstance(layer, MergeLayer):
        return layer.write, layer.read
    raise TypeError(f"layer-budget cannot read {type(layer).__name__} densely")


class BudgetLayer(LayerKV):
    def __init__(self, owner: LayerBudgetKV, layer: int, base: LayerKV) -> None:
        self.owner, self.layer = owner, layer
        self.write, self.read = dense_io(base)
        self.importance = owner.importance[layer]  # [N, bs]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttnMetadata, scale: float,
               window: int | None) -> torch.Tensor:
        step: _StepKeep = meta.kv_state  # built before this step's first write
        self.write(k, v, meta.slot_mapping)
        imp = self.importance.view(-1)
        imp[meta.slot_mapping] = 0.0
        T, H, Dh = q.shape
        out = torch.empty(T, H, Dh, dtype=q.dtype, device=q.device)
        bs = meta.block_size
        if len(step.plain):
            tables = meta.decode_block_tables[step.plain]
            kc, vc = self.read(tables)  # [B', C, K, Dh]
            mask = meta.decode_mask(window)[step.plain]
            if step.decode_masks is not None:
                mask = mask + step.decode_masks[self.layer]
            probs = decode_probs(q[step.plain], kc, mask, scale)  # [B', K, G, C]
            out[step.plain] = weighted_values(probs, vc).to(q.dtype)
            imp.index_add_(0, _slots(tables, bs).flatten(), probs.sum((1, 2)).flatten())
        if step.packed is not None:
            pk, kv = step.packed, self.owner.compaction.cells
            planes, cells = pk.planes[self.layer], pk.cells[self.layer]
            probs = decode_probs(q[pk.rows], kv[planes, 0, cells].float(), pk.masks[self.layer], scale)
            out[pk.rows] = weighted_values(probs, kv[planes, 1, cells].float()).to(q.dtype)
        for i, chunk in enumerate(meta.prefills):
            if HOLE in chunk.block_ids:
                raise RuntimeError("layer-budget: a compacted request was scheduled a prefill chunk")
            rows = slice(chunk.q_start, chunk.q_start + chunk.q_len)
            ctx = chunk.start_pos + chunk.q_len
            kc, vc = (x[:ctx] for x in self.read(chunk.block_ids))
            mask = meta.prefill_mask(i, window)
            out[rows] = prefill_attention(q[rows], kc, vc, mask, scale).to(q.dtype)
            self._observe(q[rows][-OBS:], kc, mask, chunk, scale, imp)
        return out.view(T, H * Dh)

    def _observe(self, q: torch.Tensor, kc: torch.Tensor, mask: torch.Tensor | None, chunk, scale: float,
                 imp: torch.Tensor) -> None:
        """Add the attention of a chunk's last queries q [w, H, Dh] over its context kc [C, K, Dh] to importance."""
        w, C = q.shape[0], kc.shape[0]
        if mask is None:  # causal from 0
            mask = torch.arange(C, device=q.device)[None, :] <= torch.arange(C - w, C, device=q.device)[:, None]
        else:
            mask = mask[-w:]
        add = torch.zeros(mask.shape, dtype=torch.float32, device=q.device).masked_fill_(~mask, float("-inf"))
        probs = decode_probs(q, kc[None].expand(w, -1, -1, -1), add[:, None, None, :], scale)  # [w, K, G, C]
        slots = _slots(chunk.block_ids[None], self.owner.block_size)[0, :C]
        imp.index_add_(0, slots, probs.sum((0, 1, 2)))


def _slots(tables: torch.Tensor, bs: int) -> torch.Tensor:
    """tables [B, nb] -> [B, nb * bs] flat slot ids."""
    return (tables[:, :, None] * bs + torch.arange(bs, device=tables.device)).flatten(1)


@register_policy_kv("layer-budget")
class LayerBudgetKV(PolicyKV):
    def __init__(self, policy: Any, layout: BlockLayout) -> None:
        super().__init__(policy, layout)  # the base's declared tensors and its own, in one BlockTensors
        self.base = base = POLICY_KV[policy.base.tensor_family](policy.base, layout, self.blocks)
        self.block_size = layout.block_size
        L = len(base.layers)
        self.importance = self.blocks.device["importance"]  # [L, N, bs] float32
        tags = self.blocks.device.get("tags")  # declared when it compacts (over `full`)
        self.compaction = None if tags is None else _Compaction(base, tags)
        self.layers = [BudgetLayer(self, l, base.layers[l]) for l in range(L)]
        self.record: list[list[int]] | None = None  # kept tokens per layer of each keep set, when a test asks

    def _keep(self, table: torch.Tensor, past: int, budget: int, sink: int, window: int) -> torch.Tensor:
        """[L, past] bool: which of the first `past` tokens of the request with this table each layer keeps."""
        nb = -(-past // self.block_size)
        imp = self.importance[:, table[:nb]].flatten(1)[:, :past]
        # a token next to an attended one is likely part of the same span (the digits of a number): rank by the
        # neighbourhood's max (SnapKV's pooling)
        imp = F.max_pool1d(imp[:, None], POOL, stride=1, padding=POOL // 2)[:, 0]
        keep = keep_mask(imp, budget, sink, window)
        if self.record is not None:
            self.record.append(keep.sum(1).tolist())
        return keep

    def begin_step(self, meta: AttnMetadata) -> _StepKeep:
        """Every decode request's keep sets, and the compaction the plan asks for (before layer 0 writes)."""
        bs, tables = self.block_size, meta.decode_block_tables
        plain, keeps, rows, packed = [], [], [], []
        for b, past in enumerate((meta.decode_ctx_lens - 1).tolist()):
            kv = meta.decode_kv[b]  # the plan's decisions for this request
            table = tables[b, :past // bs + 1]
            holes = (table == HOLE).nonzero()[:, 0]
            if len(holes):  # compacted in an earlier step
                dropped = range(int(holes[0]), int(holes[-1]) + 1)
            elif kv.compaction is not None:  # packed in prepare()
                dropped = range(kv.compaction.kept_blocks, kv.compaction.region_blocks)
            else:
                plain.append(b)
                keeps.append(self._keep(table, past, kv.read_tokens, kv.sink_tokens, kv.window_tokens))
                continue
            rows.append(b)
            packed.append(self.compaction.reads(table, past, dropped, bs))
        masks = None
        if plain:
            masks = torch.zeros(len(self.layers), len(plain), 1, 1, tables.shape[1] * bs, device=tables.device)
            for i, keep in enumerate(keeps):
                masks[:, i, 0, 0, :keep.shape[1]].masked_fill_(~keep, float("-inf"))
        plain_rows = torch.tensor(plain, dtype=torch.long, device=tables.device)
        return _StepKeep(plain_rows, masks, _pack(rows, packed) if rows else None)

    def prepare(self, plan: StepPlan) -> None:
        """The compactions the plan asks for, once, before the forward."""
        for r in plan.reqs:
            if r.kv.compaction is not None:
                self.compact(r.block_ids, r.kv.compaction)

    def compact(self, block_ids: list[int], c: Compaction) -> None:
        """Keep sets of a request's region (the whole blocks before its new token) for the region's share of the
        budget, and every kept cell copied into the region's first blocks (_Compaction.pack)."""
        table = torch.tensor(block_ids[:c.region_blocks], dtype=torch.long, device=self.importance.device)
        keep = self._keep(table, c.region_blocks * self.block_size, c.budget, c.sink_tokens, c.window_tokens)
        self.compaction.pack(table, keep, c.kept_blocks)


class _Compaction:
    """Which layer's token each cell of a compacted region holds (tags [L, N, bs], EMPTY: none; declared by the
    policy, so swapped with the blocks), and the base storage's cells of every plane as one index space:
    cells [L, 2, N * bs, K, Dh]."""

    def __init__(self, base: PolicyKV, tags: torch.Tensor) -> None:
        assert isinstance(base, FullKV)
        kv = base.storage.kv  # [L, 2, N, bs, K, Dh]
        L, _, N, bs = kv.shape[:4]
        self.cells = kv.view(L, 2, N * bs, *kv.shape[-2:])
        self.tags = tags

    def pack(self, blocks: torch.Tensor, keep: torch.Tensor, num_kept_blocks: int) -> None:
        """Copy the kept cells of the region (blocks [nb], keep [L, nb * bs] bool) into its first blocks: the j-th
        kept cell (by layer, then position) goes to block j // (L * bs), plane j // bs % L, slot j % bs."""
        L, bs = self.tags.shape[0], self.tags.shape[2]
        layer, pos = keep.nonzero(as_tuple=True)
        j = torch.arange(len(layer), device=blocks.device)
        assert len(j) <= num_kept_blocks * L * bs, "layer-budget: kept cells exceed the blocks kept for them"
        src = blocks[pos // bs] * bs + pos % bs
        dst_plane, dst = j // bs % L, blocks[j // (L * bs)] * bs + j % bs
        self.cells[dst_plane, :, dst] = self.cells[layer, :, src]  # a gather, then a scatter: overlaps are safe
        self.tags[:, blocks[:num_kept_blocks]] = EMPTY
        self.tags.view(L, -1)[dst_plane, dst] = layer.to(torch.uint8)

    def reads(self, table: torch.Tensor, past: int, dropped: range, bs: int) -> tuple[list[torch.Tensor],
                                                                                     list[torch.Tensor]]:
        """A compacted request's cells per layer: (planes, cells) lists of L tensors, its region's cells owned by
        the layer (blocks before `dropped`), then its tail (tokens from the block after `dropped` to `past`, this
        step's included)."""
        region = table[:dropped.start]
        tags = self.tags[:, region]  # [L, m, bs]
        plane, block, slot = (tags != EMPTY).nonzero(as_tuple=True)
        owner = tags[plane, block, slot].long()
        order = torch.argsort(owner, stable=True)
        counts = torch.bincount(owner, minlength=tags.shape[0]).tolist()
        region_planes = plane[order].split(counts)
        region_cells = (region[block] * bs + slot)[order].split(counts)
        pos = torch.arange(dropped.stop * bs, past + 1, device=table.device)
        tail = table[pos // bs] * bs + pos % bs
        planes = [torch.cat([p, torch.full_like(tail, l)]) for l, p in enumerate(region_planes)]
        cells = [torch.cat([c, tail]) for c in region_cells]
        return planes, cells


def _pack(rows: list[int], reads: list[tuple[list[torch.Tensor], list[torch.Tensor]]]) -> _Packed:
    """The compacted rows' reads as padded [L, Bp, Cp] index tensors and their masks."""
    L = len(reads[0][0])
    Cp = max(len(c) for _, cells in reads for c in cells)
    device = reads[0][1][0].device
    planes = torch.zeros(L, len(rows), Cp, dtype=torch.long, device=device)
    cells = torch.zeros_like(planes)
    masks = torch.full((L, len(rows), 1, 1, Cp), float("-inf"), device=device)
    for i, (ps, cs) in enumerate(reads):
        for l in range(L):
            n = len(cs[l])
            planes[l, i, :n], cells[l, i, :n] = ps[l], cs[l]
            masks[l, i, 0, 0, :n] = 0.0
    return _Packed(torch.tensor(rows, dtype=torch.long, device=device), planes, cells, masks)
