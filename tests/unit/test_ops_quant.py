"""Weight-only int8/int4 (ferry.ops.quant, qgemv): the stored form's packing, the kernel against dequantize-then-
matmul at every instruction-set level this machine runs (FERRY_ISA forces the lower ones in-process), and a weight
quantized on one path giving the same bytes and results on every other."""
from __future__ import annotations

import pytest
import torch

from ferry.ops import cpu, qgemv, quant
from ferry.ops.cpu import Isa
from ferry.ops.quant import QuantizedWeight, ReferenceLinear, pack_q4, prepare, quantize_weight, unpack_q4
from tests.unit.test_ops_isa import forced_isa

LEVELS = [level.label for level in Isa if level <= cpu.detected()]
PATHS = {"portable": {"portable"}, "avx2": {"avx2"}, "avx512": {"avx512"}, "avx512_bf16": {"avx512_vnni", "avx512"}}


def emulated(x: torch.Tensor, qw: QuantizedWeight) -> torch.Tensor:
    """What the kernel computes, in float64: x rounded as the kernel does (int8 per block of 32, scale
    max|x|/127 in float32, round half to even), times the dequantized weight."""
    M, K = x.shape
    xb = x.float().reshape(M, K // 32, 32)
    d = xb.abs().amax(dim=-1, keepdim=True) / 127
    q = torch.round(xb * torch.where(d > 0, 1 / d, torch.zeros_like(d))).clamp(-127, 127)
    return (q * d).reshape(M, K).double() @ qw.dequantize(torch.float32).double().T


# -- the stored form ---------------------------------------------------------------------------------------

def test_q4_packing_is_llama_cpps_q4_0_order_and_round_trips():
    u = torch.randint(0, 16, (5, 64), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    packed = pack_q4(u)
    assert packed.shape == (5, 32) and packed.dtype == torch.uint8
    for blk in range(2):  # byte i of a block: input i (low nibble), input i + 16 (high nibble)
        for i in range(16):
            assert torch.equal(packed[:, blk * 16 + i], u[:, blk * 32 + i] | (u[:, blk * 32 + 16 + i] << 4))
    assert torch.equal(unpack_q4(packed), u)


@pytest.mark.parametrize("bits,group,bound", [(8, 96, 0.01), (8, 32, 0.01), (4, 32, 0.15), (4, 96, 0.2)])
def test_quantize_weight_error_is_bounded(bits, group, bound):
    w = torch.randn(40, 96, generator=torch.Generator().manual_seed(1))
    qw = quantize_weight(w, bits, group)
    assert qw.scales.dtype == torch.float16 and qw.scales.shape == (40, 96 // group)
    assert qw.codes.shape == (40, 96 * bits // 8) and qw.shape == (40, 96)
    assert float((qw.dequantize() - w).norm() / w.norm()) < bound


@pytest.mark.parametrize("bits", [8, 4])
def test_representable_weights_round_trip_exactly(bits):
    qmax = 127 if bits == 8 else 7
    q = torch.randint(-qmax, qmax + 1, (8, 64), generator=torch.Generator().manual_seed(2)).float()
    q[:, ::32] = qmax
    assert torch.equal(quantize_weight(q * 0.25, bits, 32).dequantize(), q * 0.25)


def test_bad_weights_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_weight(torch.randn(4, 64), 4, 48)
    with pytest.raises(ValueError, match="int8 or int4"):
        quantize_weight(torch.randn(4, 64), 3, 64)
    qw = quantize_weight(torch.randn(4, 64), 4, 32)
    with pytest.raises(ValueError, match="do not fit"):
        prepare(QuantizedWeight(4, 32, qw.codes, qw.scales[:, :1]))
    with pytest.raises(ValueError, match="float16 scales"):
        prepare(QuantizedWeight(4, 32, qw.codes, qw.scales.float()))


# -- the kernel at every level ---------------------------------------------------------------------------

CASES = [(8, 224, 224), (8, 256, 64), (4, 224, 32), (4, 256, 64), (4, 256, 128), (4, 256, 256), (8, 96, 32)]


def _check_against_reference(bits: int, K: int, group: int, dtype: torch.dtype, ms: list[int]) -> None:
    g = torch.Generator().manual_seed(bits * 1000 + K + group)
    qw = quantize_weight(torch.randn(67, K, generator=g) / 8, bits, group)  # odd N: a tail of row blocks
    lin = prepare(qw)
    for M in ms:
        x = torch.randn(M, K, generator=g).to(dtype)
        calls = qgemv.kernel_calls()
        y = lin(x)
        assert y.dtype == dtype and y.shape == (M, 67)
        assert qgemv.kernel_calls() == calls + (M <= qgemv.max_m(dtype, bits))
        ref = ReferenceLinear(qw)(x.float()).double()
        want = emulated(x, qw)  # every M: the kernel's rounding of x (prefill rounds x as decode does)
        scale = float(want.abs().max())
        tol = 1e-5 if dtype == torch.float32 else 2**-8
        torch.testing.assert_close(y.double(), want, atol=tol * scale, rtol=tol, msg=f"M={M}")
        assert float((y.double() - ref).norm() / ref.norm()) < 0.02  # activation rounding: Q8_0's error


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("bits,K,group", CASES)
def test_kernel_matches_dequantize_then_matmul_at_every_level(level, bits, K, group):
    with forced_isa(level):
        assert quant.available(), quant.unavailable_reason()
        assert qgemv.path() in PATHS[level]
        for dtype in (torch.float32, torch.bfloat16):
            ms = [1, 2, 3, 4, 5, 8, 13, 16, 40, qgemv.max_m(dtype, bits) + 9]
            _check_against_reference(bits, K, group, dtype, ms)


@pytest.mark.parametrize("bits", [8, 4])
def test_stored_bytes_and_results_are_the_same_on_every_path(bits):
    """Quantize on one path, run on every other: the stored bytes never depend on the level, and every path's
    results match the portable one's to float32 rounding (the int32 block sums are identical)."""
    g = torch.Generator().manual_seed(5)
    w, x = torch.randn(51, 512, generator=g), torch.randn(6, 512, generator=g)
    stored, results = {}, {}
    for level in LEVELS:
        with forced_isa(level):
            qw = quantize_weight(w, bits, 64)
            stored[level] = (qw.codes.clone(), qw.scales.clone())
            results[level] = [prepare(qw)(x[:m]) for m in (1, 2, 6)]
    for level in LEVELS:
        assert all(torch.equal(a, b) for a, b in zip(stored[level], stored["portable"])), level
        for got, want in zip(results[level], results["portable"]):
            torch.testing.assert_close(got, want, atol=1e-5 * float(want.abs().max()), rtol=1e-5)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("bits", [8, 4])
def test_dequantize_writes_the_stored_weight_exactly(level, bits):
    qw = quantize_weight(torch.randn(33, 128, generator=torch.Generator().manual_seed(6)), bits, 32)
    with forced_isa(level):
        for dtype in (torch.float32, torch.bfloat16):
            assert torch.equal(prepare(qw).dequantize(torch.empty(33, 128, dtype=dtype)), qw.dequantize(dtype))


def test_leading_dims_and_large_m():
    qw = quantize_weight(torch.randn(40, 64, generator=torch.Generator().manual_seed(7)), 4, 32)
    x = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(prepare(qw)(x).reshape(6, 40), prepare(qw)(x.reshape(6, 64)))
    big = torch.randn(300, 64, generator=torch.Generator().manual_seed(9))
    y = prepare(qw)(big)
    for i in (0, 7, 299):  # a token's result does not depend on the batch it runs in (beyond float rounding)
        torch.testing.assert_close(y[i:i + 1], prepare(qw)(big[i:i + 1]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("bits,group", [(8, 192), (4, 32), (4, 64)])
def test_a_row_gives_the_same_bits_in_every_batch_up_to_16(level, bits, group):
    """Speculative verification (ferry/engine/speculation.py) counts on a row's result not depending on the rows
    beside it for M <= 16: each (row of x, row of W) sum is accumulated in its own lanes in the same order at every
    tile shape the kernel picks for M."""
    g = torch.Generator().manual_seed(11)
    qw = quantize_weight(torch.randn(37, 192, generator=g), bits, group)
    x = torch.randn(16, 192, generator=g).to(torch.bfloat16)
    with forced_isa(level):
        lin = prepare(qw)
        alone = torch.cat([lin(x[i:i + 1]) for i in range(16)])
        for m in (2, 3, 4, 5, 7, 16):
            assert torch.equal(lin(x[:m]), alone[:m]), m


@pytest.mark.parametrize("level", LEVELS)
def test_scratch_reused_across_shapes_gives_fresh_results(level):
    """The kernel keeps its scratch (x's codes, packed x, scales, the prefill tile) between calls: a call after a
    larger or smaller one, at either bit width and either side of MAX_M, computes what it computes first."""
    g = torch.Generator().manual_seed(12)
    weights = [quantize_weight(torch.randn(n, k, generator=g) / 8, bits, grp)
               for n, k, bits, grp in [(70, 512, 4, 32), (33, 96, 8, 96), (129, 256, 8, 64), (40, 64, 4, 64)]]
    ms = (1, 3, qgemv.MAX_M[8] + 5, qgemv.MAX_M[4] + 5)
    xs = {(m, qw.shape[1]): torch.randn(m, qw.shape[1], generator=g) for qw in weights for m in ms}
    with forced_isa(level):
        lins = [prepare(qw) for qw in weights]
        first = {(i, m): lin(xs[(m, lin.shape[1])]) for i, lin in enumerate(lins) for m in ms}
        for (i, m), want in reversed(list(first.items())):
            assert torch.equal(lins[i](xs[(m, lins[i].shape[1])]), want), (i, m)
            torch.testing.assert_close(want.double(), emulated(xs[(m, lins[i].shape[1])], weights[i]),
                                       atol=1e-5 * float(want.abs().max()), rtol=1e-5)
