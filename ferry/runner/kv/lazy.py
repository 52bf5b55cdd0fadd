"""`lazy` (LazyLLM): a step stops computing, layer by layer, the tokens its last query attends to least; a pruned
token's hidden state waits in its own KV slots so a later step whose query attends to it again revives it.

Layout: the plain paged cache ([L, 2, N, bs, K, Dh], as `full`) plus `depth` [N, bs] uint8: how many layers hold
each token's KV. A token pruned before layer b has depth b: its slots of layers >= b hold no KV, so attention at
those layers masks it, and the slots of layers b .. b+r-1 hold its hidden state (the input of layer b; r layers'
K and V slots fit D values). Pruning therefore saves compute, not memory, and pruned tokens can only be pruned at
layers <= L - r (`last`); the aux state is swapped, freed and recomputed with its block for free.

One step, per request (a "group": its scheduled rows, plus any revived rows):
- at b (`prune`, from `forward`), the scheduled rows are ranked by the attention layer b itself would give them: the decoder's
  `peek` gives b's queries and keys for the current rows before b runs, and the group's last OBSERVED scheduled
  tokens' attention over every key visible at b (averaged over them and over heads) is max-pooled over POOL
  neighbours (SnapKV: a copy reads the token after the one it attends to, so keep neighbourhoods, not isolated
  tokens). LazyLLM ranks by layer b-1's attention instead; on ferry-tiny (4 layers) that misses what layer b
  attends to: in a one-off trace of 6 passkey prompts at 4K, the needle's worst token ranked in the top 1-4% by
  layer 2's own attention but only in the top 50-70% by layer 1's. The ceil(keep(b) * scheduled) best ranked go on
  (and any row whose logits are needed); revived rows go on while they stay in the top keep(b) * context;
- revival: context tokens pruned at b by an earlier step come back when layer b-1's attention of the group's last
  queries (a pruned token has no key at b) puts them in the top keep(b) * context (at most REVIVE_MAX per group and
  layer, most attended first; and only those drawing more than an even share of attention and REVIVE_MIN, since
  ties and near ties at the threshold are noise: on random weights at 2K tokens they revived ~12 tokens per layer
  at every decode step): their saved state joins the rows, and they write their KV at b and after. Only a
  query that predicts a token (a decode, the last chunk of a prompt) revives: a middle chunk's last token is just
  where the chunk ends (so the scheduler keeps a prompt that fits a step in one: SchedulerConfig.whole_prompts).
Decode queries are never pruned and read every token computed at a layer (LazyLLM would also hide cached tokens
a decode query ranks low; here that saves nothing, so they stay visible); only revival happens in decode.
Legend: L layers, N blocks, bs block size, K kv heads, G = H / K query heads per kv head, Dh head dim, D hidden
size, C context, r aux layers, B decode rows batched.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ferry.models.layers.attention import AttnMetadata, LayerKV, write_kv
from ferry.ops.paged_attention import available as paged_decode_attention_available, paged_decode_attention_depth
from ferry.runner.kv.base import StorageKV, gather_blocks, register_policy_kv
from ferry.runner.kv.storage import BlockLayout

REVIVE_MAX = 16  # tokens a request brings back per pruning layer and step: bounds the extra work of a step
OBSERVED = 8  # a chunk's last tokens whose attention ranks the others (one token's is too noisy on ferry-tiny)
# a token counts as attended as its most attended neighbour within POOL positions (SnapKV's pooling; passkey at
# budget 0.5, one-off `ferry eval` of 30 prompts on ferry-tiny as of commit ee30440: POOL 8 keeps 67% of the
# answers where 3 kept 27%)
POOL = 8
REVIVE_MIN = 0.01  # share of a query's attention (mean over heads) a pruned token needs to come back
TILE = 512  # query rows per attention call in a chunk whose keys are gathered


@dataclass
class RowChange:
    """The rows the next layers compute after lazy drops or brings back tokens between two layers."""

    keep: torch.Tensor  # [T'] long: current rows that go on, in this order (every row whose logits are needed)
    revived: torch.Tensor | None  # [A, D] next-layer inputs of tokens brought back, appended after the kept rows
    meta: AttnMetadata  # the next layers' metadata for those T' + A rows (positions, slots, the step's groups)


@dataclass
class _Group:
    """One request's rows in the step as they go through the layers."""

    rows: torch.Tensor  # [n] its rows among the current rows
    pos: torch.Tensor  # [n] their positions
    sched: torch.Tensor  # [n] bool: scheduled this step (False: revived)
    block_ids: torch.Tensor  # [nb] its block table
    ctx: int  # context after this step: the last scheduled position + 1
    num_new: int  # tokens scheduled this step
    last: int  # index in rows of the last scheduled token (the query importance is measured from)
    # [ctx] its attention over positions at the layer before a pruning layer (-1: not seen there)
    imp: torch.Tensor | None = None


@dataclass
class _Step:
    groups: list[_Group]
    slots: torch.Tensor  # [T] the slot of each current row
    decodes: tuple | None = field(default=None)  # batched single-row groups, built on first use


class LazyLayer(LayerKV):
    def __init__(self, owner: LazyKV, layer: int) -> None:
        self.owner, self.layer = owner, layer
        self.k_cache, self.v_cache = owner.storage.layers[layer]  # [N, bs, K, Dh]
        self.changes_rows = layer + 1 in owner.pruning_layers  # LazyKV.forward prunes after this layer
        self.scores = self.changes_rows  # keep the last queries' attention for revival at the next layer

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttnMetadata, scale: float,
               window: int | None) -> torch.Tensor:
        write_kv(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
        step: _Step = meta.kv_state
        self.owner.stats["token_layers"] += q.shape[0]
        T, H, Dh = q.shape
        out = torch.empty(T, H, Dh, dtype=q.dtype, device=q.device)
        singles = [g for g in step.groups if len(g.rows) == 1]
        if singles:
            rows, o = self._decode(q, step, singles, scale, window)
            out[rows] = o.to(q.dtype)
        for g in step.groups:
            if len(g.rows) > 1:
                out[g.rows] = self._group(q, k, v, g, scale, window).to(q.dtype)
        return out.view(T, H * Dh)

    def _visible(self, block_ids: torch.Tensor, ctx: int) -> torch.Tensor:
        """[..., C] bool: which of the first C positions hold KV at this layer."""
        return self.owner.depth[block_ids].flatten(-2)[..., :ctx] > self.layer

    def _group(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: _Group, scale: float,
               window: int | None) -> torch.Tensor:
        """A prefill chunk (or a decode with revived rows): its rows over the keys visible at this layer."""
        visible = self._visible(g.block_ids, g.ctx)
        seen = bool(visible.all())
        mask = None
        if seen and len(g.rows) == g.ctx and bool(g.sched.all()) and window is None:  # a first chunk, unpruned: `full`
            kc, vc, kpos = k[g.rows], v[g.rows], None
        else:
            kc, vc = (gather_blocks(c, g.block_ids)[:g.ctx] for c in (self.k_cache, self.v_cache))
            kpos = torch.arange(g.ctx, device=q.device)
            if not seen:
                kpos = visible.nonzero()[:, 0]
                kc, vc = kc[kpos], vc[kpos]
            mask = kpos[None, :] <= g.pos[:, None]
            if window is not None:
                mask &= g.pos[:, None] - kpos[None, :] < window
        qg = q[g.rows]
        qf, kf, vf = (t.float().transpose(0, 1)[None] for t in (qg, kc, vc))  # [1, heads, rows or keys, Dh]
        if mask is None:
            o = F.scaled_dot_product_attention(qf, kf, vf, is_causal=True, scale=scale, enable_gqa=True)
        else:  # in tiles of rows, each over the keys up to its last position: causal work, not rows x keys
            o = torch.empty_like(qf)
            for s in range(0, len(g.rows), TILE):
                hi = int(torch.searchsorted(kpos, g.pos[s:s + TILE].max(), right=True))
                o[:, :, s:s + TILE] = F.scaled_dot_product_attention(
                    qf[:, :, s:s + TILE], kf[:, :, :hi], vf[:, :, :hi], attn_mask=mask[s:s + TILE, :hi], scale=scale,
                    enable_gqa=True)
        if self.scores:  # the last OBSERVED scheduled tokens still computed (the last one always is)
            keys = kpos if kpos is not None else torch.arange(g.ctx, device=q.device)
            obs = (g.sched & (g.pos >= g.ctx - OBSERVED)).nonzero()[:, 0]
            g.imp = torch.full((g.ctx,), -1.0, device=q.device)
            g.imp[keys] = _importance(qg[obs], kc, keys[None, :] <= g.pos[obs][:, None], scale)
        return o[0].transpose(0, 1)

    def _decode(self, q: torch.Tensor, step: _Step, singles: list[_Group], scale: float,
                window: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Single-row groups batched: the C++ paged kernel (masking by depth, and returning the attention when this
        layer's scores are needed), or the gathered torch path."""
        rows, pos, tables, ctx_lens = self.owner.decode_batch(step, singles)
        C = tables.shape[1] * self.owner.block_size
        kpos = torch.arange(C, device=q.device)[None, :]
        depth = self.owner.depth[tables].flatten(1)  # [B, C]
        visible = (kpos < ctx_lens[:, None]) & (depth > self.layer)
        if window is not None:
            visible &= pos[:, None] - kpos < window
        qd = q[rows]
        if q.device.type == "cpu" and paged_decode_attention_available():
            out, probs = paged_decode_attention_depth(qd, self.k_cache, self.v_cache, tables, ctx_lens,
                                                      self.owner.depth, self.layer, window, scale, self.scores)
            if self.scores:
                self._keep_scores(singles, probs.mean(1), visible)
            return rows, out
        kc, vc = gather_blocks(self.k_cache, tables), gather_blocks(self.v_cache, tables)  # [B, C, K, Dh]
        B, H, Dh = qd.shape
        K = kc.shape[2]
        scores = torch.einsum("bkgd,bckd->bkgc", qd.float().view(B, K, H // K, Dh), kc.float()) * scale
        scores.masked_fill_(~visible[:, None, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1)  # [B, K, G, C]
        if self.scores:
            self._keep_scores(singles, probs.mean((1, 2)), visible)
        return rows, torch.einsum("bkgc,bckd->bkgd", probs, vc.float()).reshape(B, H, Dh)

    @staticmethod
    def _keep_scores(singles: list[_Group], probs: torch.Tensor, visible: torch.Tensor) -> None:
        """Each decode group's attention per key [C] (probs [B, C], -1 where not visible), for the pruning layer."""
        imp = probs.masked_fill(~visible, -1.0)
        for b, g in enumerate(singles):
            g.imp = imp[b, :g.ctx]


def _pooled(imp: torch.Tensor) -> torch.Tensor:
    """Each seen key's importance raised to its most important neighbour's within POOL positions."""
    return torch.where(imp >= 0, F.max_pool1d(imp[None, None], 2 * POOL + 1, 1, POOL)[0, 0], imp)


def _top_threshold(imp: torch.Tensor, frac: float, ctx: int) -> float:
    """The importance of the ceil(frac * ctx)-th most important seen key (0 when fewer are seen)."""
    seen = imp[imp >= 0]
    k = math.ceil(frac * ctx)
    return float(seen.topk(k).values[-1]) if k < len(seen) else 0.0


def _importance(q: torch.Tensor, kc: torch.Tensor, visible: torch.Tensor, scale: float) -> torch.Tensor:
    """q [W, H, Dh] (a chunk's last queries), kc [C, K, Dh], visible [W, C] -> [C]: each key's attention
    probability, averaged over queries and heads."""
    W, H, Dh = q.shape
    K = kc.shape[1]
    scores = torch.einsum("wkgd,ckd->wkgc", q.float().view(W, K, H // K, Dh), kc.float()) * scale
    scores.masked_fill_(~visible[:, None, None, :], float("-inf"))
    return torch.softmax(scores, dim=-1).mean((0, 1, 2))


@register_policy_kv("lazy")
class LazyKV(StorageKV):
    def __init__(self, policy: Any, layout: BlockLayout) -> None:
        super().__init__(policy, layout)
        cfg = layout.model
        self.block_size = layout.block_size
        self.num_layers = L = cfg.num_layers
        self.hidden_size = cfg.hidden_size
        self.depth = self.blocks.device["depth"]  # [N, bs] uint8
        # a token pruned before layer b keeps its state in its slots of layers b .. b+r-1
        self.aux_layers = -(-cfg.hidden_size // (2 * cfg.num_kv_heads * cfg.head_dim))
        self.layers: list[LazyLayer] = []
        self.set_schedule([policy.keep_fraction(l, L - self.aux_layers) for l in range(L)])
        # token_layers: rows computed summed over layers; scheduled_token_layers: what full attention computes
        self.stats = {"token_layers": 0, "scheduled_token_layers": 0, "pruned": 0, "revived": 0}

    def set_schedule(self, keep: list[float]) -> None:
        """keep[l]: fraction of a step's tokens computed at layer l (non-increasing; tokens are pruned where it drops,
        at layers <= L - r only)."""
        assert all(keep[l] == keep[l - 1] for l in range(self.num_layers - self.aux_layers + 1, self.num_layers))
        self.keep = keep
        self.pruning_layers = {l for l in range(1, self.num_layers) if keep[l] < keep[l - 1]}
        self.layers = [LazyLayer(self, l) for l in range(self.num_layers)]

    # -- the step's rows -------------------------------------------------------------------------

    def forward(self, model: torch.nn.Module, input_ids: torch.Tensor, meta: AttnMetadata,
                logits_indices: torch.Tensor) -> torch.Tensor:
        """The decoder's layers with the pruning between them: after a layer whose next one prunes, prune() picks
        the rows that go on and the tokens that come back, and the logits rows are found where they end up.
        input_ids [T] -> float32 logits [S, V] for logits_indices [S] (never pruned)."""
        residual = model.embed_tokens(input_ids)
        cos, sin = model.rotary.tables(meta.positions, residual.dtype)
        h = None
        rows = torch.arange(len(input_ids), device=residual.device)  # the step row of each current row (-1: revived)
        for i, (layer, kv) in enumerate(zip(model.layers, self.layers)):
            h = layer(h, residual, cos, sin, meta, kv)
            if kv.changes_rows:
                residual += h  # the next layer's input, whole: pruned tokens' states are kept from it
                h = None
                peek = partial(model.layers[i + 1].queries_keys, residual, cos, sin)
                change = self.prune(i + 1, residual, meta, torch.isin(rows, logits_indices), peek)
                if change is not None:
                    residual, rows = _apply(change, residual, rows)
                    meta = change.meta
                    cos, sin = model.rotary.tables(meta.positions, residual.dtype)
        if h is not None:
            residual += h
        where = torch.full((len(input_ids),), -1, dtype=torch.long, device=rows.device)
        where[rows[rows >= 0]] = torch.nonzero(rows >= 0)[:, 0]
        return model.logits(residual[where[logits_indices]])

    def begin_step(self, meta: AttnMetadata) -> _Step:
        """The step's groups, before layer 0 (where every row is a scheduled token: its depth starts at L)."""
        self.depth.view(-1)[meta.slot_mapping] = self.num_layers
        self.stats["scheduled_token_layers"] += len(meta.slot_mapping) * self.num_layers
        dev, groups = meta.positions.device, []
        for b in range(meta.num_decodes):
            ctx = int(meta.decode_ctx_lens[b])
            groups.append(_Group(torch.tensor([b], device=dev), meta.positions[b:b + 1],
                                 torch.ones(1, dtype=torch.bool, device=dev),
                                 meta.decode_block_tables[b, :-(-ctx // self.block_size)], ctx, 1, 0))
        for c in meta.prefills:
            groups.append(_Group(torch.arange(c.q_start, c.q_start + c.q_len, device=dev),
                                 torch.arange(c.start_pos, c.start_pos + c.q_len, device=dev),
                                 torch.ones(c.q_len, dtype=torch.bool, device=dev), c.block_ids,
                                 c.start_pos + c.q_len, c.q_len, c.q_len - 1))
        return _Step(groups, meta.slot_mapping)

    def decode_batch(self, step: _Step, singles: list[_Group]) -> tuple[torch.Tensor, ...]:
        """(rows [B], positions [B], block tables [B, nb] padded with block 0, context lengths [B])."""
        if step.decodes is None:
            dev = singles[0].rows.device
            nb = max(len(g.block_ids) for g in singles)
            tables = torch.zeros(len(singles), nb, dtype=torch.long, device=dev)
            for b, g in enumerate(singles):
                tables[b, :len(g.block_ids)] = g.block_ids
            step.decodes = (torch.cat([g.rows for g in singles]), torch.cat([g.pos for g in singles]), tables,
                            torch.tensor([g.ctx for g in singles], dtype=torch.long, device=dev))
        return step.decodes

    def prune(self, b: int, x: torch.Tensor, meta: AttnMetadata, needed: torch.Tensor,
              peek: Callable[[], tuple[torch.Tensor, torch.Tensor]]) -> RowChange | None:
        """Before pruning layer b: which rows go on, which pruned tokens come back (see the module docstring)."""
        step, frac, bs = meta.kv_state, self.keep[b], self.block_size
        qk = peek() if any(int(g.sched.sum()) > 1 for g in step.groups) else None
        keeps, revived_pos = [], []
        for g in step.groups:
            imp = _pooled(g.imp)  # layer b-1's attention: what revival reads (a pruned token has no key at b)
            rank = _pooled(self._own_importance(b, g, *qk)) if int(g.sched.sum()) > 1 else imp
            row_imp = rank[g.pos]
            keep = ~g.sched.clone()
            sched = g.sched.nonzero()[:, 0]
            k_sched = math.ceil(frac * g.num_new)
            keep[sched if len(sched) <= k_sched else sched[row_imp[sched].topk(k_sched).indices]] = True
            thr = _top_threshold(imp, frac, g.ctx)
            rank_thr = thr if rank is imp else _top_threshold(rank, frac, g.ctx)
            keep &= g.sched | (row_imp >= rank_thr)  # revived rows stay while attended
            keep |= needed[g.rows]
            keep[g.last] = True
            keeps.append(keep)
            depth = self.depth[g.block_ids].flatten()[:g.ctx]
            # pruned at b by an earlier step, attended again: in the top fraction, above an even share and REVIVE_MIN
            floor = max(1.0 / int((imp >= 0).sum()), REVIVE_MIN)
            cand = ((depth == b) & (imp >= thr) & (imp > floor)).nonzero()[:, 0]
            if not needed[g.rows[g.last]]:  # a chunk that predicts nothing: revive for next-token queries only
                cand = cand[:0]
            if len(cand) > REVIVE_MAX:
                cand = cand[imp[cand].topk(REVIVE_MAX).indices]
            revived_pos.append(cand)
        num_pruned = sum(int((~k).sum()) for k in keeps)
        num_revived = sum(len(c) for c in revived_pos)
        if not num_pruned and not num_revived:
            return None
        self.stats["pruned"] += num_pruned
        self.stats["revived"] += num_revived
        revived_slots = [self._slots(g, p) for g, p in zip(step.groups, revived_pos)]
        all_revived = torch.cat(revived_slots)
        revived_x = self._load(b, all_revived) if num_revived else None
        self.depth.view(-1)[all_revived] = self.num_layers
        gone = torch.cat([g.rows[~k] for g, k in zip(step.groups, keeps)])
        self._save(b, step.slots[gone], x[gone])
        self.depth.view(-1)[step.slots[gone]] = b
        # the new rows: every group's kept rows in order, then every group's revived tokens
        keep_rows = torch.cat([g.rows[k] for g, k in zip(step.groups, keeps)])
        n_kept, dev = len(keep_rows), x.device
        groups, at, rat = [], 0, n_kept
        for g, k, p in zip(step.groups, keeps, revived_pos):
            nk, nr = int(k.sum()), len(p)
            rows = torch.cat((torch.arange(at, at + nk, device=dev), torch.arange(rat, rat + nr, device=dev)))
            groups.append(_Group(rows, torch.cat((g.pos[k], p)),
                                 torch.cat((g.sched[k], torch.zeros(nr, dtype=torch.bool, device=dev))),
                                 g.block_ids, g.ctx, g.num_new, int(k[:g.last].sum())))
            at, rat = at + nk, rat + nr
        positions = torch.cat((meta.positions[keep_rows], *revived_pos))
        slots = torch.cat((step.slots[keep_rows], all_revived))
        empty = torch.zeros(0, 0, dtype=torch.long, device=dev)
        new = AttnMetadata(positions, slots, bs, 0, empty, empty.view(0), kv_state=_Step(groups, slots))
        return RowChange(keep_rows, revived_x, new)

    def _own_importance(self, b: int, g: _Group, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """[ctx]: layer b's own attention, from peek's queries q [T, H, Dh] (scaled) and keys k [T, K, Dh] of the
        current rows, of the group's last OBSERVED scheduled rows over every key visible at b: the cached ones and
        the group's rows (whose KV b has not written yet). -1 where not visible."""
        layer = self.layers[b]
        cached = layer._visible(g.block_ids, g.ctx)
        cached[g.pos] = False
        cpos = cached.nonzero()[:, 0]
        keys, kpos = k[g.rows], g.pos
        if len(cpos):
            keys = torch.cat((gather_blocks(layer.k_cache, g.block_ids)[:g.ctx][cpos].to(k.dtype), keys))
            kpos = torch.cat((cpos, kpos))
        obs = (g.sched & (g.pos >= g.ctx - OBSERVED)).nonzero()[:, 0]
        imp = torch.full((g.ctx,), -1.0, device=q.device)
        imp[kpos] = _importance(q[g.rows[obs]], keys, kpos[None, :] <= g.pos[obs][:, None], 1.0)
        return imp

    def _slots(self, g: _Group, pos: torch.Tensor) -> torch.Tensor:
        return g.block_ids[pos // self.block_size] * self.block_size + pos % self.block_size

    def _aux(self, b: int, slots: torch.Tensor) -> tuple:
        """The index of the aux state of tokens at `slots` pruned before layer b: kv[b:b+r, :, block, offset]."""
        return slice(b, b + self.aux_layers), slice(None), slots // self.block_size, slots % self.block_size

    def _save(self, b: int, slots: torch.Tensor, x: torch.Tensor) -> None:
        kv = self.storage.kv  # [L, 2, N, bs, K, Dh]
        r, K, Dh = self.aux_layers, kv.shape[4], kv.shape[5]
        flat = torch.zeros(len(slots), r * 2 * K * Dh, dtype=kv.dtype, device=kv.device)
        flat[:, :x.shape[1]] = x
        kv[self._aux(b, slots)] = flat.view(-1, r, 2, K, Dh).permute(1, 2, 0, 3, 4)

    def _load(self, b: int, slots: torch.Tensor) -> torch.Tensor:
        a = self.storage.kv[self._aux(b, slots)]  # [r, 2, n, K, Dh]
        return a.permute(2, 0, 1, 3, 4).reshape(len(slots), -1)[:, :self.hidden_size]


def _apply(change: RowChange, residual: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """residual [T, D], rows [T] -> the kept rows, then the revived ones (step row -1)."""
    residual, rows = residual[change.keep], rows[change.keep]
    if change.revived is not None and len(change.revived):
        residual = torch.cat((residual, change.revived.to(residual.dtype)))
        rows = torch.cat((rows, torch.full((len(change.revived),), -1, dtype=rows.dtype, device=rows.device)))
    return residual, rows
