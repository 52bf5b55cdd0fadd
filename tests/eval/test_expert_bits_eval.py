"""`ferry eval MODEL --expert-bits auto --expert-store-size SIZE` on a tiny random MoE: one row per store, each
store's size where it should be, and the baseline agreeing with itself."""
from __future__ import annotations

import pytest

from ferry.cli import main
from ferry.config import ModelConfig
from ferry.eval.bits import bits_table, compare_expert_bits
from ferry.eval.suite import EvalConfig
from ferry.experts.bitwidth import Format, format_nbytes
from ferry.experts.layout import ExpertLayout
from tests.checkpoints import make_checkpoint


def test_quality_next_to_size(tmp_ckpt_dir):
    ckpt = make_checkpoint("qwen3_moe", tmp_ckpt_dir)
    cfg = ModelConfig.from_hf(str(ckpt))
    layout = ExpertLayout.for_shape("float32", cfg.hidden_size, cfg.moe.intermediate_size, 32)
    n = cfg.moe.num_experts * sum(cfg.moe.sparse_layers)
    int4, int8 = (n * format_nbytes(layout, Format(b, 32)) for b in (4, 8))
    size = (int4 + int8) // 2
    rows = compare_expert_bits(str(ckpt), size, {"dtype": "float32"}, EvalConfig(ppl_tokens=200, ppl_window=100),
                               calibration_tokens=256, calibration_rows=16)
    assert [r.label.split(",")[0] for r in rows] == ["full precision", "uniform int8", "uniform int4", "auto", "auto"]
    full, r8, r4, real, gauss = rows
    assert full.top1_agreement == 1 and full.perplexity_change == 0 and full.nbytes > r8.nbytes == int8
    assert r4.nbytes == int4 and all(int4 <= r.nbytes <= size for r in (real, gauss))
    assert all(0 <= r.top1_agreement <= 1 and r.perplexity > 1 for r in rows)
    assert r8.perplexity_change == pytest.approx(r8.perplexity / full.perplexity - 1)
    text = bits_table(rows)
    assert "recorded inputs" in text and "Gaussian inputs" in text and len(text.splitlines()) == 6


def test_eval_expert_bits_needs_a_size(capsys):
    assert main(["eval", "m", "--expert-bits", "auto"]) == 2
    assert "--expert-store-size" in capsys.readouterr().err
