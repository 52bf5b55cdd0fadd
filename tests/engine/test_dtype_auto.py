"""``--dtype auto``: bfloat16 only where the CPU computes it natively and the checkpoint is 16-bit, float32 otherwise,
with the choice and its reason in the startup log. The CPU's level is faked (``cpu.detected``) or lowered
(``FERRY_ISA``), so every branch runs on any machine."""
from __future__ import annotations

import logging

import pytest
import torch

from ferry.config import ModelConfig
from ferry.engine import factory
from ferry.errors import InvalidRequest
from ferry.ops import cpu
from ferry.ops.cpu import Isa

CPU = torch.device("cpu")


@pytest.fixture
def level(monkeypatch):
    """Set the CPU's level (x86): level(Isa.AVX2) makes this process an AVX2-only machine."""
    def set_level(isa: Isa) -> None:
        monkeypatch.setattr(cpu.platform, "machine", lambda: "x86_64")
        monkeypatch.setattr(cpu, "detected", lambda: isa)
        monkeypatch.delenv(cpu.ENV, raising=False)
        cpu.isa.cache_clear()
    yield set_level
    cpu.isa.cache_clear()


@pytest.mark.parametrize("isa,checkpoint,want", [
    (Isa.AVX512_BF16, "bfloat16", torch.bfloat16),
    (Isa.AVX512_BF16, "float16", torch.bfloat16),
    (Isa.AVX512_BF16, "float32", torch.float32),
    (Isa.AVX512, "bfloat16", torch.float32),  # AVX-512 without BF16 (Skylake-SP, Ice Lake): emulated
    (Isa.AVX2, "bfloat16", torch.float32),  # AVX2 (Zen 2/3, Intel client): emulated
    (Isa.AVX2, "float16", torch.float32),
    (Isa.PORTABLE, "bfloat16", torch.float32),
])
def test_auto_picks_bfloat16_only_where_it_is_native(level, monkeypatch, caplog, isa, checkpoint, want):
    level(isa)
    cfg = _model_cfg(monkeypatch, checkpoint)
    with caplog.at_level(logging.INFO, logger="ferry"):
        assert factory.resolve_dtype("auto", cfg, CPU) == want
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("dtype "))
    assert line.startswith(f"dtype {str(want).removeprefix('torch.')} (auto: ")
    assert f"the checkpoint is {checkpoint}" in line
    if checkpoint != "float32":
        assert ("natively" if want == torch.bfloat16 else "no native bfloat16") in line


def test_a_lowered_level_counts_as_the_cpu_it_stands_for(level, monkeypatch):
    """FERRY_ISA=avx2 on a bf16 CPU runs what an AVX2 CPU runs, dtype included."""
    level(Isa.AVX512_BF16)
    monkeypatch.setenv(cpu.ENV, "avx2")
    cpu.isa.cache_clear()
    name, why = factory.auto_dtype("bfloat16", CPU)
    assert name == "float32" and "avx2 (FERRY_ISA" in why


def test_arm_reads_bf16_from_its_features(monkeypatch):
    monkeypatch.setattr(cpu.platform, "machine", lambda: "aarch64")
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"fp", "asimd", "bf16", "i8mm"}))
    assert cpu.native_bf16() and factory.auto_dtype("bfloat16", CPU)[0] == "bfloat16"
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"fp", "asimd"}))
    assert not cpu.native_bf16() and factory.auto_dtype("bfloat16", CPU)[0] == "float32"


def test_an_explicit_dtype_is_kept_and_an_emulated_bfloat16_says_so(level, monkeypatch, caplog):
    level(Isa.AVX2)
    cfg = _model_cfg(monkeypatch, "bfloat16")
    with caplog.at_level(logging.INFO, logger="ferry"):
        assert factory.resolve_dtype("bfloat16", cfg, CPU) == torch.bfloat16
        assert factory.resolve_dtype("float32", cfg, CPU) == torch.float32
    assert "no native bfloat16" in caplog.text and "--dtype float32" in caplog.text
    with pytest.raises(InvalidRequest, match="auto, float32 or bfloat16"):
        factory.resolve_dtype("float64", cfg, CPU)


def test_the_engine_runs_the_auto_dtype(level, tmp_ckpt_dir, caplog):
    """A bfloat16 checkpoint on a (faked) AVX2 CPU loads as float32: its KV blocks are float32's size (the same
    budget holds as many as --dtype float32 gets, half of bfloat16's)."""
    from ferry import LLM
    from tests.checkpoints import make_checkpoint

    level(Isa.AVX2)
    path = make_checkpoint("llama", tmp_ckpt_dir, dtype=torch.bfloat16)
    blocks = {}
    with caplog.at_level(logging.INFO, logger="ferry"):
        for dtype in ("auto", "float32", "bfloat16"):
            with LLM(str(path), dtype=dtype, kv_cache_memory="4M") as llm:
                blocks[dtype] = llm.view().num_kv_blocks
    assert blocks["auto"] == blocks["float32"] < blocks["bfloat16"]
    assert "dtype float32 (auto: this CPU has no native bfloat16" in caplog.text


def _model_cfg(monkeypatch, checkpoint_dtype: str) -> ModelConfig:
    """A ModelConfig stand-in: resolve_dtype reads only checkpoint_dtype."""
    class Cfg:
        pass

    cfg = Cfg()
    cfg.checkpoint_dtype = checkpoint_dtype
    return cfg  # type: ignore[return-value]
