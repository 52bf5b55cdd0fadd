"""`ferry roofline` end to end on a tiny random model, with a small fake hardware profile (--hardware) instead of
measuring this machine; and the engine's decode weight bandwidth that /metrics exports."""
from __future__ import annotations

import json

import pytest

from ferry.cli import main
from ferry.engine.stats import EngineStats
from ferry.roofline.measure import REST, SCOPES
from ferry.server.metrics import ServerMetrics
from tests.checkpoints import make_checkpoint

FAKE = {"cpu": "fake", "isa": "portable", "threads": 1, "torch": "x", "read_gbs": 10.0,
        "peak_gflops": {"float32": 50.0, "bfloat16": 100.0}, "bf16_native": False, "dispatch_us": 5.0, "notes": []}
DENSE_OPS = ["embedding", "attn_norm", "qkv_proj", "rotary", "attention", "o_proj", "mlp_norm", "gate_up", "act",
             "down", "final_norm", "lm_head", REST, "step"]


@pytest.fixture(scope="module")
def ckpt(tmp_ckpt_dir):
    return make_checkpoint("llama", tmp_ckpt_dir)


@pytest.fixture
def fake_hw(tmp_path):
    path = tmp_path / "hw.json"
    path.write_text(json.dumps(FAKE))
    return path


def test_roofline_runs_the_step_and_reports_every_operator(ckpt, fake_hw, tmp_path, capsys):
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    assert main(["roofline", str(ckpt), "--hardware", str(fake_hw), "--batch-size", "2", "--prompt-len", "8",
                 "--steps", "1", "--threads", "1", "--json", str(out), "--plot", str(png)]) == 0
    results = json.loads(out.read_text())
    assert [r["workload"]["phase"] for r in results] == ["prefill", "decode"]
    for r in results:
        assert r["hardware"]["read_gbs"] == 10.0  # the profile given, not a measurement
        assert [row["op"] for row in r["rows"]] == DENSE_OPS
        step = r["rows"][-1]
        assert step["predicted_s"] == pytest.approx(sum(row["predicted_s"] for row in r["rows"][:-1]))
        assert step["measured_s"] > 0 and step["percent_of_roofline"] > 0
        for row in r["rows"][:-1]:  # every operator ran under its scope and got a time
            assert row["measured_s"] is not None and row["flops"] >= 0 and row["bytes"] > 0, row["op"]
        assert r["rows"][2]["measured_s"] > 0  # qkv_proj
    assert png.stat().st_size > 0
    text = capsys.readouterr().out
    assert "qkv_proj" in text and "% roof" in text


def test_analysis_only_with_quantization(ckpt, fake_hw, tmp_path):
    outs = {}
    for q in ("none", "int4"):
        outs[q] = tmp_path / f"{q}.json"
        assert main(["roofline", str(ckpt), "--hardware", str(fake_hw), "--phase", "decode", "--no-run",
                     "--quantization", q, "--json", str(outs[q])]) == 0
    none, int4 = (json.loads(outs[q].read_text())[0]["rows"] for q in ("none", "int4"))
    assert all(row["measured_s"] is None for row in none)
    w_none = {r["op"]: r["weight_bytes"] for r in none}
    w_int4 = {r["op"]: r["weight_bytes"] for r in int4}
    assert w_int4["gate_up"] == pytest.approx(w_none["gate_up"] * (0.5 + 2 / 32) / 4)  # float32 checkpoint


def test_a_bad_hardware_file_says_what_to_do(ckpt, tmp_path):
    bad = tmp_path / "hw.json"
    bad.write_text("{}")
    with pytest.raises(SystemExit, match="hardware profile"):
        main(["roofline", str(ckpt), "--hardware", str(bad), "--no-run"])


def test_scopes_cover_the_analysis_operators():
    assert set(DENSE_OPS) - {REST, "step"} <= set(SCOPES)


def test_decode_weight_bandwidth_reaches_metrics(ckpt):
    from ferry.engine.llm import LLM
    from ferry.request import SamplingParams
    from ferry.roofline.analysis import decode_weight_bytes
    from ferry.config import ModelConfig

    with LLM(str(ckpt), threads=1) as llm:
        assert llm.engine.stats().decode_weight_bytes_per_s == 0.0  # nothing decoded yet
        llm.generate([[5, 6, 7]], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
        stats = llm.engine.stats()
        # the engine's constant agrees with the analysis' weight bytes (they differ by norm weights and biases)
        cfg = ModelConfig.from_hf(ckpt)
        assert llm.engine.decode_weight_bytes == pytest.approx(decode_weight_bytes(cfg), rel=0.02)
    assert stats.decode_weight_bytes_per_s > 0
    text = ServerMetrics(lambda: EngineStats(decode_weight_bytes_per_s=2.5e9), "m").render().decode()
    assert 'ferry_decode_weight_bytes_per_second{model_name="m"} 2.5e+09' in text


def test_a_step_the_engine_cannot_run_keeps_the_analysis(ckpt, fake_hw, tmp_path, capsys):
    """Until LLM takes `quantization`, --quantization without --no-run prints the analysis and says why nothing was
    measured (exit 2); once LLM takes it, the step runs and is measured."""
    from ferry.engine.options import ENGINE_OPTIONS
    out = tmp_path / "q.json"
    code = main(["roofline", str(ckpt), "--hardware", str(fake_hw), "--phase", "decode", "--quantization", "int8",
                 "--steps", "1", "--threads", "1", "--prompt-len", "8", "--json", str(out)])
    rows = json.loads(out.read_text())[0]["rows"]
    if any(o.name == "quantization" for o in ENGINE_OPTIONS):
        assert code == 0 and rows[-1]["measured_s"] > 0
    else:
        assert code == 2 and rows[-1]["measured_s"] is None
        assert "cannot run --quantization int8" in capsys.readouterr().err
