"""The one entry point for the model's matmuls, so kernels are chosen in one place (ferry.ops): a weight is a
float tensor (ferry.ops.gemv's decode kernel or F.linear) or a weight-only quantized `QuantLinear`
(ferry.ops.quant.prepare's kernel for the stored int8/int4 form; see ferry/quant/)."""
from __future__ import annotations

import torch

from ferry.ops import gemv
from ferry.ops.quant import QuantLinear

Weight = torch.Tensor | QuantLinear  # [N, K] float, or int8/int4 codes and scales behind a kernel


def linear(x: torch.Tensor, weight: Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ weight.T (+ bias) -> [M, N] in x's dtype."""
    if isinstance(weight, QuantLinear):
        y = weight(x)
        return y if bias is None else y + bias
    return gemv.linear(x, weight, bias)


def embedding(weight: Weight, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows ids [T] of an embedding table [V, D] -> [T, D] in dtype (a copy): a float table's rows, or a quantized
    table's rows dequantized (a tied model's quantized head: only those rows' codes and scales are read)."""
    if isinstance(weight, QuantLinear):
        return weight.rows(ids, dtype)
    return weight[ids]  # fancy indexing copies


def dense(weight: Weight, shape: tuple[int, int]) -> torch.Tensor:
    """The weight as a float tensor [N, K] = shape (a quantized one dequantized to float32): for code that reads
    the matrix itself rather than its product (e.g. a KV policy's key basis)."""
    if isinstance(weight, QuantLinear):
        return weight.dequantize(torch.empty(shape, dtype=torch.float32))
    return weight
