"""bench roofline's record becomes docs/roofline.md's table and the README summary row."""
from __future__ import annotations

import pytest

from bench.roofline import case, section
from bench.summary import roofline_row

HW = {"cpu": "cpu X", "isa": "avx2", "threads": 2, "read_gbs": 20.0, "peak_gflops": {"float32": 100.0},
      "dispatch_us": 5.0}


def result(phase: str, predicted: float, measured: float) -> dict:
    rows = [{"op": "gate_up", "predicted_s": predicted * 0.9, "measured_s": measured * 0.5},
            {"op": "attention", "predicted_s": predicted * 0.1, "measured_s": measured * 0.5},
            {"op": "step", "predicted_s": predicted, "measured_s": measured}]
    return {"workload": {"phase": phase, "batch_size": 16, "dtype": "float32", "prompt_len": 32, "kv_len": 128},
            "rows": rows}


def test_cases_judge_the_25_percent_target_and_name_the_largest_miss():
    good, bad = case("m", result("decode", 0.09, 0.1)), case("m", result("prefill", 0.05, 0.1))
    assert good["within_25pct"] and good["ratio"] == pytest.approx(0.9)
    assert not bad["within_25pct"] and bad["worst_op"] == "attention"  # 0.005 predicted vs 0.05 measured
    record = {"hardware": HW, "cases": [good, bad], "machine": {"git": "abc", "argv": ["bench", "roofline"]}}
    text = section(record)
    assert "1 of 2 cases within 25%" in text and "| m | float32 | decode, KV 128 | 16 | 90.00 | 100.00 | 0.90 | yes |" in text
    row = roofline_row(record, "docs/roofline.md#x")
    assert row[0] == "roofline model" and row[-2].endswith("not yet") and "0.90 / 0.50" in row[1]
