"""ferry.ops.gemv.linear (small-M CPU GEMV kernel) against a float64 reference."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from ferry.ops import cpu, gemv

# The level in force: the CPU's, or the lower one FERRY_ISA names (which these tests then run as). The kernel has a
# body for every level (tests/unit/test_ops_paths.py runs each one on this machine).
HAS_TOOLCHAIN = shutil.which("c++") is not None and shutil.which("ninja") is not None

needs_kernel = pytest.mark.skipif(not HAS_TOOLCHAIN, reason="no C++ compiler or ninja: gemv.linear is F.linear")


def _dtype_needs(dtype: torch.dtype) -> str:
    return f"the {dtype} kernel does not run at {cpu.describe()}"


# (K, N): K multiples and non-multiples of 16/32 (tails), odd N (row-block tails).
SHAPES = [(1, 1), (7, 3), (32, 8), (33, 17), (72, 5), (100, 13), (256, 64), (896, 131)]
M_ALL = list(range(1, 17))


def _ref(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 result and the float64 sum of |terms| (error scale)."""
    xd, wd = x.double(), w.double()
    ref = xd @ wd.T
    scale = xd.abs() @ wd.abs().T
    if b is not None:
        ref = ref + b.double()
        scale = scale + b.double().abs()
    return ref, scale


def _check(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> None:
    ref, scale = _ref(x, w, b)
    assert y.dtype == x.dtype and y.shape == ref.shape
    err = (y.double() - ref).abs()
    if x.dtype == torch.float32:
        tol = 1e-5 * scale + 1e-30
    else:
        # float32 accumulation, one bf16 rounding of the output (2^-9 relative,
        # allow 2^-8), plus accumulation noise relative to the magnitude of
        # the terms (matters where the sum cancels).
        tol = 2.0**-8 * ref.abs() + 1e-5 * scale + 1e-30
    bad = err > tol
    assert not bad.any(), (
        f"max err {err.max().item():.3e}, worst excess {(err - tol).max().item():.3e}, "
        f"{int(bad.sum())} of {bad.numel()} elements out of tolerance"
    )


def _data(m: int, k: int, n: int, dtype: torch.dtype, bias: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed * 7919 + m * 131 + k * 17 + n)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    return x, w, b


def test_kernel_builds_where_cpu_supports_it():
    # A broken build must not silently fall back to F.linear: every level has a body, both dtypes run.
    if not HAS_TOOLCHAIN:
        pytest.skip("no C++ compiler or ninja: no kernel can be built")
    assert gemv.available(), gemv.unavailable_reason()
    assert gemv.supported_dtypes() == {torch.float32: True, torch.bfloat16: True}
    assert gemv.KERNEL.ext().isa_level() == int(cpu.isa())
    assert bool(gemv.KERNEL.ext().cpu_features() & 4) == (cpu.isa() >= cpu.Isa.AVX512_BF16)  # native bf16


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("k,n", SHAPES, ids=[f"K{k}N{n}" for k, n in SHAPES])
def test_matches_float64_reference(dtype, bias, k, n):
    if not gemv.supported_dtypes()[dtype]:
        pytest.skip(_dtype_needs(dtype))
    for m in M_ALL:
        x, w, b = _data(m, k, n, dtype, bias)
        y = gemv.KERNEL.ext().linear_small_m(x, w, b)  # the kernel itself, no dispatch
        _check(y, x, w, b)
        _check(gemv.linear(x, w, b), x, w, b)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_qwen_like_shapes(dtype):
    if not gemv.supported_dtypes()[dtype]:
        pytest.skip(_dtype_needs(dtype))
    for m, k, n in [(1, 896, 4864), (3, 4864, 896), (8, 896, 1000), (16, 896, 128)]:
        x, w, b = _data(m, k, n, dtype, bias=m % 2 == 1)
        _check(gemv.KERNEL.ext().linear_small_m(x, w, b), x, w, b)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_dispatch_uses_kernel(dtype):
    if not gemv.supported_dtypes()[dtype]:
        pytest.skip(_dtype_needs(dtype))
    x, w, b = _data(4, 72, 9, dtype, bias=True)
    n0 = gemv.kernel_calls()
    gemv.linear(x, w, b)
    gemv.linear(x.reshape(2, 2, 72), w)  # leading dims are flattened
    gemv.linear(x[0], w)  # 1-D input
    assert gemv.kernel_calls() - n0 == 3
    big = torch.randn(gemv.MAX_M[dtype] + 1, 72).to(dtype)
    gemv.linear(big, w)  # above the crossover: F.linear
    gemv.linear(x, w.T.contiguous().T)  # non-contiguous weight: F.linear
    gemv.linear(x.double(), w.double())  # unsupported dtype: F.linear
    wg = w.clone().requires_grad_()
    gemv.linear(x, wg)  # autograd needed: F.linear
    with torch.no_grad():
        gemv.linear(x, wg)  # no autograd: kernel
    assert gemv.kernel_calls() - n0 == 4
    x12 = torch.randn(12, 72).to(dtype)  # every M <= MAX_M, small weights too (batch invariance)
    gemv.linear(x12, w)
    assert gemv.kernel_calls() - n0 == 5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_leading_dims_and_fallbacks(dtype):
    # Works with or without the kernel: results must match F.linear semantics.
    x, w, b = _data(6, 100, 11, dtype, bias=True)
    x3 = x.reshape(2, 3, 100)
    y3 = gemv.linear(x3, w, b)
    assert y3.shape == (2, 3, 11)
    _check(y3.reshape(6, 11), x, w, b)

    y1 = gemv.linear(x[2], w, b)  # 1-D
    assert y1.shape == (11,)
    _check(y1.unsqueeze(0), x[2:3], w, b)

    xt = torch.randn(100, 5).to(dtype).T  # non-contiguous x
    _check(gemv.linear(xt, w), xt, w, None)

    xb = torch.randn(40, 100).to(dtype)  # large M -> F.linear
    _check(gemv.linear(xb, w, b), xb, w, b)

    x0 = torch.randn(0, 100).to(dtype)  # empty batch
    assert gemv.linear(x0, w, b).shape == (0, 11)

    xs = torch.randn(2, 100, dtype=torch.float64)  # unsupported dtype -> F.linear
    torch.testing.assert_close(gemv.linear(xs, w.double()), F.linear(xs, w.double()))


@needs_kernel
def test_bf16_matmuls_above_the_kernel_run_at_few_row_counts():
    """bfloat16 rows above the kernel's range are rounded up (oneDNN keeps a ~250 KB primitive per row count: a
    server's ever-new token counts grew the process without bound, ~1 MB per 40 requests); the padded rows never
    reach the result."""
    ext = gemv.KERNEL.ext()
    buckets = {ext.bf16_rows_bucket(m) for m in range(17, 4097)}
    assert len(buckets) <= 60
    for m in range(17, 4097):
        assert m <= ext.bf16_rows_bucket(m) <= max(m + 15, m * 9 // 8)
    w, b = torch.randn(24, 40).bfloat16(), torch.randn(24).bfloat16()
    for shape in ((17, 40), (3, 50, 40), (129, 40)):
        x = torch.randn(*shape).bfloat16()
        y = gemv.linear(x, w, b)
        assert y.shape == (*shape[:-1], 24) and y.is_contiguous()
        torch.testing.assert_close(y, F.linear(x, w, b), rtol=1.6e-2, atol=1e-2)


def test_autograd_falls_back():
    x = torch.randn(2, 33, requires_grad=True)
    w = torch.randn(5, 33, requires_grad=True)
    gemv.linear(x, w).sum().backward()
    assert x.grad is not None and w.grad is not None
    with torch.no_grad():
        y = gemv.linear(x, w)
    torch.testing.assert_close(y, F.linear(x, w).detach(), rtol=1e-5, atol=1e-5)


@needs_kernel
def test_thread_count_does_not_change_result():
    if not gemv.available():
        pytest.skip(f"kernel unavailable: {gemv.unavailable_reason()}")
    x, w, b = _data(3, 896, 1001, torch.float32, bias=True)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1 = gemv.linear(x, w, b)
        torch.set_num_threads(max(2, before))
        y2 = gemv.linear(x, w, b)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(y1, y2)
