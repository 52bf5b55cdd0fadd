"""`--expert-bits auto` (EdgeMoE's expert-wise bitwidth, FineQuant's granularity): what each expert loses at each
candidate format, measured on the inputs the router really sends it.

A candidate `Format` is the expert dense in the store's dtype, int8 per row, or int4 at one of FineQuant's
granularities (one scale per row, or per 256 / 128 / 64 / 32 inputs where that divides both D and I). An expert's
error at a format is the relative error of its output on a sample X [n, D] of its recorded inputs,
    err = ||f_Q(X) - f(X)||_F / ||f(X)||_F,   f(X) = (silu(X Wg^T) * X Wu^T) Wd^T,
with the weights quantized by the store's own code path (QuantLayout.quantize, then dequantized: the kernel's
Q8_0 rounding of X is common to every quantized format and left out). Its weight in the total is its share of the
layer's routed (token, slot) assignments (`Calibration.share`), so an expert the text never routes to costs
nothing and takes the smallest format (EdgeMoE's observation: rarely used experts tolerate fewer bits).

Why recorded inputs and not Gaussian ones: the residual stream has outlier channels and a few directions that
carry most of its energy; an expert whose large weights sit on those channels is far more sensitive than Gaussian
inputs say, and one whose outliers sit on channels the stream never uses is less so (`Calibration.gaussian` is the
old yardstick, kept for comparison). The recording itself runs the model and lives at eval's rank
(ferry/eval/activations.py); allocation is ferry/experts/allocate.py. Legend: D hidden, I expert intermediate,
n sampled rows, K inputs of a matrix."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch

from ferry.experts.layout import ExpertLayout
from ferry.ops.quant import QBLOCK

Key = tuple[int, int]  # (MoE layer, expert)
MAX_INT4_GROUP = 256  # coarser groups than this are never better than one scale per row by enough to matter


@dataclass(frozen=True)
class Format:
    """How one expert is stored: bits 0 (dense, the store's dtype), 8 (per row) or 4 (group inputs per scale,
    0: one per row)."""

    bits: int
    group: int | None = None

    @property
    def name(self) -> str:
        if self.bits == 0:
            return "dense"
        if self.bits == 8:
            return "int8"
        return "int4/row" if self.group == 0 else f"int4/g{self.group}"


def candidate_formats(layout: ExpertLayout) -> list[Format]:
    """Every format an expert of this shape can take (int4 only where 32 divides D and I)."""
    D, I = layout.hidden_size, layout.intermediate_size
    out = [Format(0), Format(8)]
    if D % QBLOCK == 0 and I % QBLOCK == 0:
        out.append(Format(4, 0))
        out += [Format(4, g) for g in (256, 128, 64, 32) if g <= MAX_INT4_GROUP and D % g == 0 and I % g == 0]
    return out


def format_nbytes(layout: ExpertLayout, fmt: Format) -> int:
    """Bytes of one record at fmt on disk (ALIGNed): what the store size counts."""
    return layout.record_format(fmt.bits, fmt.group).record_nbytes


@dataclass
class Calibration:
    """Inputs recorded per expert: a bounded sample of the rows routed to it, and how often it was picked."""

    samples: dict[Key, torch.Tensor]  # (layer, expert) -> [n, D] float32, n <= the recording's row limit
    counts: dict[Key, int]  # (layer, expert) -> (token, slot) assignments routed to it
    layer_rows: dict[int, torch.Tensor]  # MoE layer -> [n, D] sample of all its inputs (for experts with no rows)
    source: str  # what was recorded, for the report (e.g. "heldout.txt: 8192 tokens")
    min_rows: int = 8  # fewer sampled rows than this: the expert's error is measured on its layer's inputs

    def share(self, key: Key) -> float:
        """key's share of its layer's routed assignments (0 if the text never routed to it)."""
        total = sum(c for (l, _), c in self.counts.items() if l == key[0])
        return self.counts.get(key, 0) / total if total else 0.0

    def rows(self, key: Key) -> torch.Tensor:
        x = self.samples.get(key)
        return x if x is not None and x.shape[0] >= self.min_rows else self.layer_rows[key[0]]

    @classmethod
    def gaussian(cls, layers: Iterable[int], num_experts: int, hidden: int, rows: int = 64,
                 seed: int = 0) -> "Calibration":
        """Unit Gaussian inputs and equal shares: the yardstick without data (what `--expert-bits auto` used
        before it recorded real activations)."""
        g = torch.Generator().manual_seed(seed)
        layers = list(layers)
        x = {l: torch.randn(rows, hidden, generator=g) for l in layers}
        return cls({(l, e): x[l] for l in layers for e in range(num_experts)},
                   {(l, e): 1 for l in layers for e in range(num_experts)}, x, f"Gaussian inputs, {rows} rows")


@dataclass
class ExpertCost:
    """One expert's measured options: (format, record bytes, relative output error), and its weight."""

    key: Key
    share: float  # of its layer's routed assignments
    rows: int  # sampled input rows measured on (0: its layer's inputs were used)
    options: list[tuple[Format, int, float]] = field(default_factory=list)


def swiglu(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """x [n, D] -> [n, D] through one expert (float32)."""
    gate, up = (x @ gate_up.T).chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up) @ down.T


def output_errors(gate_up: torch.Tensor, down: torch.Tensor, x: torch.Tensor, layout: ExpertLayout,
                  formats: list[Format]) -> list[float]:
    """Relative output error of one expert (gate_up [2I, D], down [D, I] as the store holds them dense) on x
    [n, D] at each format."""
    g32, d32, x = gate_up.float(), down.float(), x.float()
    want = swiglu(x, g32, d32)
    norm = want.norm().clamp(min=1e-12)
    out = []
    for fmt in formats:
        if fmt.bits == 0:  # the reference itself: the store's dense weights
            out.append(0.0)
            continue
        gq, dq = layout.record_format(fmt.bits, fmt.group).quantize(gate_up, down)
        out.append(float((swiglu(x, gq.dequantize(), dq.dequantize()) - want).norm() / norm))
    return out


def measure_layer(layer: int, experts: dict[str, torch.Tensor], calibration: Calibration, layout: ExpertLayout,
                  formats: list[Format]) -> list[ExpertCost]:
    """Every expert of one MoE layer (experts: read_experts' {"gate_up": [E, 2I, D], "down": [E, D, I]})."""
    costs = []
    for e in range(experts["gate_up"].shape[0]):
        key = (layer, e)
        own = calibration.samples.get(key)
        rows = 0 if own is None or own.shape[0] < calibration.min_rows else own.shape[0]
        errors = output_errors(experts["gate_up"][e], experts["down"][e], calibration.rows(key), layout, formats)
        costs.append(ExpertCost(key, calibration.share(key), rows,
                                [(f, format_nbytes(layout, f), err) for f, err in zip(formats, errors)]))
    return costs
