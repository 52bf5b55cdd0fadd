"""How each weight matrix is quantized: its bits and its group size (FineQuant's adaptive granularity).

int8 keeps one scale per output channel (G = K): its rounding error is ~1/250 of a row's largest weight, far below
what changes a token. int4 has 16 levels, so one outlier in a group coarsens the step for all its weights; FineQuant
(Kim et al. 2023) picks the granularity per matrix from the weights alone. Here each candidate group (per channel,
then each halving that divides K: 512, 256, ..., 32) is measured by its relative weight error
e(G) = ||W - Q_G(W)||_F / ||W||_F, and the coarsest G with e(G) <= (1 + slack) e(32) is kept: a finer group is paid
for (a float16 scale per 32 weights is 0.5 bit a weight, per 64 is 0.25) only where it removes real error. A
smooth matrix stops early; one whose rows carry outliers (e(K) far above e(32)) goes down to 32. Measured on
ferry-tiny (held-out perplexity, float32 = 42.57): every matrix at 32: +1.00%; every matrix at 64: +1.23%; the
int8 per channel: +0.02%. slack = 0.15 keeps ferry-tiny's matrices at 64 (e(64) ~ 1.11 e(32)) and its outlier ones
at 32.

Why the weight error and not the output error on calibration activations: for inputs x with uncorrelated unit
channels E||(W - Q)x||^2 = ||W - Q||_F^2, so it is the expected output error without a calibration set, and the
same numbers at load and at `ferry convert` (no data to keep in step). Activations with outlier channels weight
some columns more; a calibration-aware choice would slot in as another `Scheme.error`.

A matrix whose input size K is not a multiple of 32 cannot take int4 (Q4_0's 32-input blocks): it is int8 per
channel whatever is asked (stories260K's down projection, K = 172), as llama.cpp falls back for such tensors.
Legend: N outputs, K inputs, G inputs per scale."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ferry.errors import InvalidRequest
from ferry.ops.quant import QBLOCK, QuantizedWeight, check_group, quantize_weight

BITS = {"int8": 8, "int4": 4}
# --quantization-lm-head: the head's bits (None: kept in float); int8 unless asked, whatever --quantization says
HEAD_BITS = {"int8": 8, "int4": 4, "none": None}
DEFAULT_HEAD = "int8"
# a coarser int4 group is kept while its weight error is at most (1 + INT4_SLACK) x the finest group's (see above)
INT4_SLACK = 0.15


@dataclass(frozen=True)
class Scheme:
    """What `--quantization` / `--quantization-group-size` ask for."""

    bits: int  # 8 or 4
    group_size: int | None = None  # forced for every matrix that can take it; None: chosen per matrix
    slack: float = INT4_SLACK
    head_bits: int | None = 8  # the lm_head's (a tied model's embedding, which is its head); None: kept in float

    @classmethod
    def parse(cls, method: str, group_size: int | None = None, lm_head: str | None = None) -> "Scheme":
        if method not in BITS:
            raise InvalidRequest(f"quantization must be int8 or int4, got {method!r}")
        if (lm_head or DEFAULT_HEAD) not in HEAD_BITS:
            raise InvalidRequest(f"quantization_lm_head must be int8, int4 or none, got {lm_head!r}")
        return cls(BITS[method], group_size, head_bits=HEAD_BITS[lm_head or DEFAULT_HEAD])

    @property
    def name(self) -> str:
        return f"int{self.bits}"

    @property
    def head_name(self) -> str:
        """The head's setting as --quantization-lm-head spells it: int8, int4 or none."""
        return "none" if self.head_bits is None else f"int{self.head_bits}"

    def for_head(self) -> "Scheme":
        """The scheme the lm_head is quantized with: its own bits, the same forced group size and slack."""
        if self.head_bits is None:
            raise ValueError("the lm_head is kept in float under this scheme")
        return Scheme(self.head_bits, self.group_size, self.slack, self.head_bits)

    def quantize(self, w: torch.Tensor, name: str) -> QuantizedWeight:
        """w [N, K] (any float dtype) at this scheme's bits and the group chosen for it."""
        K = w.shape[1]
        if K % QBLOCK:  # no 32-input group or Q4_0 block fits: int8 per output channel
            return quantize_weight(w, 8, K)
        if self.group_size is not None:
            reason = check_group(self.bits, K, self.group_size)
            if reason:
                raise InvalidRequest(f"--quantization-group-size {self.group_size} does not fit {name} ({reason}); "
                                     f"use one of {', '.join(map(str, candidate_groups(K)))}")
            return quantize_weight(w, self.bits, self.group_size)
        if self.bits == 8:
            return quantize_weight(w, 8, K)
        return self.adaptive(w)

    def adaptive(self, w: torch.Tensor) -> QuantizedWeight:
        """The coarsest candidate group whose relative error is within (1 + slack) of the finest group's."""
        w = w.float()
        candidates = [quantize_weight(w, self.bits, g) for g in candidate_groups(w.shape[1])]  # coarsest first
        errors = [relative_error(q, w) for q in candidates]
        return next(q for q, e in zip(candidates, errors) if e <= (1 + self.slack) * errors[-1])


def candidate_groups(K: int) -> list[int]:
    """Group sizes for K inputs, coarsest first: K (per channel), then K/2, K/4, ... while a multiple of 32 that
    divides K; 32 always ends the list when 32 divides K."""
    out, g = [K], K
    while g % 2 == 0 and g // 2 >= QBLOCK and (g // 2) % QBLOCK == 0:
        g //= 2
        out.append(g)
    if K % QBLOCK == 0 and out[-1] != QBLOCK:
        out.append(QBLOCK)
    return out


def relative_error(qw: QuantizedWeight, w: torch.Tensor) -> float:
    """||W - Q(W)||_F / ||W||_F (what the adaptive choice measures)."""
    w = w.float()
    return float((qw.dequantize() - w).norm() / w.norm().clamp(min=1e-30))
