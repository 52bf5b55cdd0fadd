"""The I/O-compute planner (after Klotski's constraint-sensitive planner): from measured disk bandwidth and
expert compute time, and the cache budget, pick how many experts to prefetch per layer (width), for how
many layers ahead (depth), and how many sequences to decode per step, and say why (`--explain`).

ferry already runs Klotski's expert-aware order inside a step: every token of the step goes through a
layer together, so each expert read serves all the tokens routed to it, experts in RAM are computed
first while the others are read, and the next layer's predicted experts are read during this layer's
compute. What is left to choose is how much work a step carries (more sequences: more compute to hide
reads behind, but more distinct experts to read) and how far prefetch may reach (no more than the disk can
read during one layer, nor than the cache can hold beside the layer's own experts).

Model, per MoE layer of a decode step with B sequences (E experts, top-A routing, L MoE layers, S slots):
  distinct experts      n(B) = E (1 - (1 - A/E)^B)
  reads                 m(B) = n(B) (1 - min(1, S / (L E)))       (the share of experts not kept in RAM)
  compute               c(B) = n(B) c0 + B A c1                   (per-expert overhead, per-token cost)
  I/O                   r(B) = m(B) bytes / bandwidth
  layer time            max(c, r) with prefetch (reads overlap compute), c + r without
  throughput            B / (L x layer time)"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ferry.experts.store import ExpertStore
from ferry.models.layers.mlp import swiglu


@dataclass(frozen=True)
class Costs:
    bandwidth: float  # bytes/s of expert reads from disk (measured)
    expert_nbytes: int  # bytes read per expert
    expert_overhead_s: float  # c0: compute time of an expert for one token
    token_s: float  # c1: extra compute time per additional token routed to an expert


@dataclass(frozen=True)
class Plan:
    batch: int  # sequences per step the planner recommends (at most max_num_seqs)
    prefetch_width: int  # experts read ahead per layer
    prefetch_depth: int  # MoE layers ahead
    costs: Costs
    rows: list[dict] = field(default_factory=list)  # per candidate batch: the model's numbers
    notes: list[str] = field(default_factory=list)

    def explain(self) -> str:
        c = self.costs
        lines = [f"expert plan: disk {c.bandwidth / 1e9:.2f} GB/s, {c.expert_nbytes / 2**20:.2f} MiB per expert "
                 f"({1e3 * c.expert_nbytes / c.bandwidth:.2f} ms to read); expert compute "
                 f"{1e3 * c.expert_overhead_s:.3f} ms + {1e3 * c.token_s:.3f} ms/token",
                 "  (estimates per MoE layer of a decode step, from the model in ferry/experts/planner.py)",
                 "  batch  experts/layer  reads/layer  compute ms  I/O ms  tok/s (prefetch)  tok/s (none)"]
        for r in self.rows:
            mark = "  <- plan" if r["batch"] == self.batch else ""
            lines.append(f"  {r['batch']:5d}  {r['distinct']:13.1f}  {r['reads']:11.1f}  {r['compute_ms']:10.3f}  "
                         f"{r['io_ms']:6.3f}  {r['tok_s']:16.1f}  {r['tok_s_serial']:12.1f}{mark}")
        lines.append(f"  prefetch width {self.prefetch_width} experts per layer, depth {self.prefetch_depth} layers; "
                     f"batch {self.batch} sequences per step (recommended: --max-num-seqs)")
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])


def measure_costs(store: ExpertStore, num_probe: int = 4) -> Costs:
    """Read a few experts (O_DIRECT / fadvise, like every read) and time one expert's compute at 1 and 16 tokens."""
    layer = min(store.index.layer_files)
    probe = list(range(min(num_probe, store.index.num_experts)))
    s0 = store.stats()
    x16 = torch.zeros(16, store.layout.hidden_size, dtype=store.dtype)
    timings = {}
    for _, gate_up, down in store.weights(layer, probe):
        for T in (1, 16):
            t0 = time.perf_counter()
            for _ in range(5):
                swiglu(x16[:T], gate_up, down)  # the forward's own path (dense, fused int8/int4 or dequantized)
            timings.setdefault(T, []).append((time.perf_counter() - t0) / 5)
    s1 = store.stats()
    read_bytes = s1.bytes_read - s0.bytes_read
    read_s = s1.read_seconds - s0.read_seconds
    store.empty()  # the probe leaves nothing behind: neither cached experts nor counts
    store.reset_stats()
    bandwidth = read_bytes / read_s if read_bytes and read_s > 0 else 2.5e9  # all cached already: a typical disk
    c1, c16 = min(timings[1]), min(timings[16])
    mean_nbytes = store.index.total_nbytes // (len(store.index.experts) * store.index.num_experts)  # mixed bits
    return Costs(bandwidth, mean_nbytes, c1, max(c16 - c1, 0.0) / 15)


def make_plan(costs: Costs, num_experts: int, top_k: int, num_layers: int, num_slots: int,
              max_num_seqs: int) -> Plan:
    E, A, L = num_experts, top_k, num_layers
    kept = min(1.0, num_slots / (L * E))
    rows = []
    for B in sorted({1, 2, 4, 8, 16, 32, 64, max_num_seqs}):
        if B > max_num_seqs:
            continue
        n = E * (1 - (1 - A / E) ** B)
        m = n * (1 - kept)
        c = n * costs.expert_overhead_s + B * A * costs.token_s
        r = m * costs.expert_nbytes / costs.bandwidth
        rows.append({"batch": B, "distinct": n, "reads": m, "compute_ms": 1e3 * c, "io_ms": 1e3 * r,
                     "tok_s": B / (L * max(c, r, 1e-9)), "tok_s_serial": B / (L * max(c + r, 1e-9))})
    best = max(r["tok_s"] for r in rows)
    chosen = next(r for r in rows if r["tok_s"] >= 0.9 * best)  # the smallest batch within 10% of the best
    # experts the disk reads during one layer's compute (at least a token's worth), and that the cache holds
    # (a finished layer's experts are the first to go: they are a whole forward away from their next use)
    readable = int(chosen["compute_ms"] / 1e3 * costs.bandwidth / costs.expert_nbytes)
    width = 0 if kept >= 1 else min(E, num_slots, max(readable, A))  # all experts stay in RAM: nothing to guess
    # two layers ahead when the disk reads two layers' guesses during one layer's compute and the cache holds them
    # beside the layer's own experts (only predictors that see past the next layer use it: pre-gating)
    depth = 2 if width and readable >= 2 * width and num_slots >= round(chosen["distinct"]) + 2 * width else 1
    notes = []
    if kept >= 1:
        notes.append("every expert fits in the cache: after the first reads nothing is read again")
    if chosen["io_ms"] > chosen["compute_ms"]:
        notes.append("I/O-bound even with prefetch: a larger --expert-cache-memory, a quantized store "
                     "(ferry convert --expert-bits) or more sequences per step would help")
    if num_slots < round(chosen["distinct"]):
        notes.append(f"the cache holds {num_slots} experts, fewer than one layer needs per step "
                     f"({chosen['distinct']:.1f}): experts are re-read within a step")
    return Plan(chosen["batch"], width, depth, costs, rows, notes)
