"""ferry.ops.cpu and each kernel's choice by instruction-set level: detection, the FERRY_ISA override (lower only),
the warm-up, and every op's lower path (forced by the override on this machine) giving the kernel path's results."""
from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F

from ferry import ops
from ferry.ops import cpu, fused, gemv, paged_attention
from ferry.ops.cpu import Isa

AVX2_FLAGS = {"avx2", "fma", "f16c"}
AVX512_FLAGS = AVX2_FLAGS | {"avx512f", "avx512bw", "avx512vl", "avx512dq"}
has_toolchain = shutil.which("c++") is not None and shutil.which("ninja") is not None


def needs(level: Isa, flags: str) -> pytest.MarkDecorator:
    """Skip unless `level` is in force (the CPU has it and FERRY_ISA does not lower the run below it)."""
    return pytest.mark.skipif(cpu.isa() < level, reason=f"needs {level.label} ({flags}); this process runs at "
                                                         f"{cpu.describe()}")


needs_toolchain = pytest.mark.skipif(not has_toolchain, reason="no C++ compiler or ninja: no kernel can be built")


@contextmanager
def forced_isa(text: str) -> Iterator[Isa]:
    """FERRY_ISA=text for the block (read afresh), then the environment and the level as they were."""
    old = os.environ.get(cpu.ENV)
    os.environ[cpu.ENV] = text
    cpu.isa.cache_clear()
    try:
        yield cpu.isa()
    finally:
        if old is None:
            del os.environ[cpu.ENV]
        else:
            os.environ[cpu.ENV] = old
        cpu.isa.cache_clear()


@pytest.mark.parametrize("flags,level", [
    (set(), Isa.PORTABLE),
    ({"sse4_2", "avx", "avx2", "fma"}, Isa.PORTABLE),  # no f16c: not the AVX2 level
    (AVX2_FLAGS, Isa.AVX2),
    (AVX2_FLAGS | {"avx512f", "avx512bw"}, Isa.AVX2),  # partial AVX-512 (no VL/DQ)
    (AVX512_FLAGS, Isa.AVX512),
    (AVX512_FLAGS | {"avx512_bf16"}, Isa.AVX512_BF16),
    (AVX2_FLAGS | {"avx512_bf16"}, Isa.AVX2),  # a level needs every lower one
])
def test_level_of_cpu_flags(flags, level):
    assert cpu.level_of(frozenset(flags)) == level


def test_override_lowers_the_level_and_never_raises_it(monkeypatch, caplog):
    with forced_isa("portable") as level:
        assert level == Isa.PORTABLE and cpu.overridden() == (cpu.detected() > Isa.PORTABLE)
        assert cpu.describe().startswith("portable")
    monkeypatch.setattr(cpu, "detected", lambda: Isa.AVX2)  # an AVX2 CPU asked for AVX-512
    with caplog.at_level(logging.WARNING, logger="ferry"), forced_isa("AVX512") as level:
        assert level == Isa.AVX2 and not cpu.overridden()
    assert "more than this CPU has" in caplog.text


def test_an_unknown_override_is_an_error_naming_the_levels():
    with pytest.raises(ValueError, match="portable, avx2, avx512, avx512_bf16"), forced_isa("sse9"):
        pass


def test_compile_flags_enable_only_the_levels_instructions():
    assert cpu.compile_flags(Isa.PORTABLE) == ["-DFERRY_ISA_LEVEL=0"]
    avx2 = cpu.compile_flags(Isa.AVX2)
    assert "-mavx2" in avx2 and "-mfma" in avx2 and not any(f.startswith("-mavx512") for f in avx2)
    assert "-mavx512f" in cpu.compile_flags(Isa.AVX512) and "-mavx512bf16" not in cpu.compile_flags(Isa.AVX512)
    assert "-mavx512bf16" in cpu.compile_flags(Isa.AVX512_BF16)


@needs_toolchain
def test_warm_up_loads_every_kernel_so_no_request_compiles():
    reasons = ops.warm_up()
    assert set(reasons) == set(ops.KERNELS)
    for name in ("gemv", "paged_attention", "fused", "read_pool"):  # a body for every level
        assert reasons[name] is None and ops.KERNELS[name].KERNEL.loaded() is not None, name


def test_engine_start_warms_the_kernels_up_before_any_request(tmp_ckpt_dir, monkeypatch):
    from ferry import LLM
    from ferry.engine import factory
    from tests.checkpoints import make_checkpoint

    calls = []
    monkeypatch.setattr(factory, "warm_up", lambda: calls.append("warm_up") or {})
    with LLM(str(make_checkpoint("llama", tmp_ckpt_dir)), dtype="float32", kv_cache_memory="4M"):
        assert calls == ["warm_up"]


@needs_toolchain
@needs(Isa.AVX512, "avx512f/bw/vl/dq")
def test_gemv_below_avx512_runs_its_own_build_with_the_kernels_results():
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(3, 256, generator=g), torch.randn(96, 256, generator=g) / 16, torch.randn(96, generator=g)
    module = gemv.KERNEL.ext()
    calls = gemv.kernel_calls()
    y_kernel = gemv.linear(x, w, b)
    assert gemv.kernel_calls() == calls + 1
    for text, level in (("avx2", 1), ("portable", 0)):
        with forced_isa(text):
            assert gemv.available() and all(gemv.supported_dtypes().values())
            assert gemv.KERNEL.ext() is not module and gemv.KERNEL.ext().isa_level() == level
            assert gemv.KERNEL.loaded().__name__.endswith(f"_{text}")
            before = gemv.kernel_calls()
            y = gemv.linear(x, w, b)
            assert gemv.kernel_calls() == before + 1
            torch.testing.assert_close(y, y_kernel, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(y, F.linear(x, w, b), atol=1e-5, rtol=1e-5)
    assert gemv.KERNEL.ext() is module and gemv.kernel_calls() == calls + 1  # back at the CPU's level


def _fused_outputs(dtype: torch.dtype) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    x, res = (torch.randn(3, 96, generator=g).to(dtype) for _ in range(2))
    weight = torch.randn(96, generator=g).to(dtype)
    normed = fused.add_rms_norm(x, res, weight, 1e-6)
    rot = torch.randn(3, 4, 16, generator=g).to(dtype)
    fused.rotary_(rot, *(torch.randn(3, 16, generator=g).to(dtype) for _ in range(2)))
    return [normed, res, fused.silu_mul(torch.randn(3, 140, generator=g).to(dtype)), rot]


@needs_toolchain
@needs(Isa.AVX2, "avx2, fma, f16c")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_portable_build_is_bit_identical_to_this_cpus(dtype):
    native = _fused_outputs(dtype)
    module = fused.KERNEL.loaded()
    with forced_isa("portable"):
        assert fused.available()  # plain C++: a portable build of its own, not the fallback
        assert fused.KERNEL.loaded() is not module and fused.KERNEL.loaded().__name__.endswith("_portable")
        portable = _fused_outputs(dtype)
    for a, b in zip(native, portable):
        assert torch.equal(a, b)


@needs_toolchain
@needs(Isa.AVX2, "avx2, fma, f16c")
def test_paged_attention_portable_build_matches_this_cpus():
    g = torch.Generator().manual_seed(3)
    k_cache, v_cache = torch.randn(2, 24, 4, 2, 16, generator=g)
    tables, lens = torch.randperm(24, generator=g)[:15].view(3, 5), torch.tensor([1, 9, 20])
    q = torch.randn(3, 8, 16, generator=g)
    native = paged_attention.paged_decode_attention(q, k_cache, v_cache, tables, lens, None, 0.25)
    with forced_isa("portable"):
        assert paged_attention.available() and paged_attention.KERNEL.loaded().__name__.endswith("_portable")
        portable = paged_attention.paged_decode_attention(q, k_cache, v_cache, tables, lens, None, 0.25)
    torch.testing.assert_close(portable, native, atol=2e-6, rtol=1e-5)  # FMA contraction differs: not bit-equal
