"""ferry eval end to end on tiny random checkpoints: numbers that can be checked against transformers."""
from __future__ import annotations

import math

import pytest
import torch

from ferry import LLM
from ferry.eval.report import heatmap, table
from ferry.eval.suite import EvalConfig, eval_moe, eval_perplexity, evaluate
from tests.checkpoints import hf_logits, make_checkpoint, random_prompts


@pytest.fixture(scope="module")
def llama(tmp_ckpt_dir):
    return make_checkpoint("llama", tmp_ckpt_dir)


def test_perplexity_equals_transformers(llama):
    ids = random_prompts(1, [200], vocab_size=300, seed=1)[0]
    with LLM(str(llama), dtype="float32") as llm:
        got = eval_perplexity(llm, ids, EvalConfig(ppl_tokens=200, ppl_window=64))
    nll, n = 0.0, 0
    for i in range(0, 200, 64):
        chunk = ids[i:i + 64]
        lp = torch.log_softmax(hf_logits(llama, chunk), -1)
        nll -= sum(lp[j - 1, chunk[j]].item() for j in range(1, len(chunk)))
        n += len(chunk) - 1
    assert got["tokens"] == n
    assert got["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-4)


def test_evaluate_runs_baseline_beside_options_and_renders(llama, tmp_path):
    cfg = EvalConfig(lengths=(400,), depths=(0.0, 1.0), samples=1, ppl_tokens=300, ppl_window=100,
                     text=tmp_path / "text.txt")
    cfg.text.write_text("Once upon a time there was a little fox. " * 200)
    reports = evaluate(str(llama), {"dtype": "float32", "enable_prefix_caching": False}, cfg)
    assert [r.options for r in reports] == [{"dtype": "float32"}, {"dtype": "float32", "enable_prefix_caching": False}]
    for r in reports:
        assert {c["task"] for c in r.retrieval} == {"passkey", "multikey", "kv", "vartrack"}
        assert all(c["total"] == 1 and c["length"] == 400 for c in r.retrieval)
    # prefix caching is lossless: same perplexity and same retrieval answers either way
    assert reports[0].perplexity == reports[1].perplexity
    assert reports[0].retrieval == reports[1].retrieval
    assert reports[1].agreement["top1_agreement"] == 1.0 and reports[1].agreement["perplexity_change"] == 0.0
    text = table(reports)
    assert "perplexity (held-out)" in text and "passkey @ 400 tokens" in text
    heatmap(reports, tmp_path / "h.png")
    assert (tmp_path / "h.png").stat().st_size > 1000


def test_quantization_beside_full_precision(llama, tmp_path):
    import json

    from ferry.eval.suite import to_json

    cfg = EvalConfig(parts=("ppl",), ppl_tokens=300, ppl_window=100, text=tmp_path / "text.txt")
    cfg.text.write_text("Once upon a time there was a little fox. " * 200)
    base, q = evaluate(str(llama), {"dtype": "float32", "quantization": "int4"}, cfg)
    assert base.options == {"dtype": "float32"} and base.agreement is None
    assert q.agreement["positions"] == q.perplexity["tokens"] == len(q.top1) == len(base.top1)
    want = sum(a == b for a, b in zip(base.top1, q.top1)) / len(base.top1)
    assert q.agreement["top1_agreement"] == want
    assert q.agreement["perplexity_change"] == pytest.approx(q.perplexity["perplexity"] / base.perplexity["perplexity"] - 1)
    text = table([base, q])
    assert "greedy top-1 agreement per token" in text and "perplexity vs full precision" in text
    assert all("top1" not in r for r in json.loads(json.dumps(to_json([base, q], cfg)))["reports"])


def test_moe_routing_report(tmp_ckpt_dir):
    folder = make_checkpoint("mixtral", tmp_ckpt_dir)
    ids = random_prompts(1, [700], vocab_size=300, seed=2)[0]
    with LLM(str(folder), dtype="float32") as llm:
        rep = eval_moe(llm, ids, EvalConfig())
        assert not hasattr(llm.engine.parts.runner.model.layers[0].mlp, "route") or \
            "route" not in vars(llm.engine.parts.runner.model.layers[0].mlp)  # recording hook removed
    assert rep["tokens"] == 700
    for shares in rep["expert_share"]:
        assert sum(shares) == pytest.approx(1.0)
    assert len(rep["next_layer_top4_recall"]) == len(rep["expert_share"]) - 1
    assert all(0.0 <= r <= 1.0 for r in rep["next_layer_top4_recall"])


def test_bad_eval_arguments_are_clear_errors(llama, capsys):
    from ferry.cli import main

    assert main(["eval", str(llama), "--lengths", "100000", "--parts", "retrieval"]) == 2
    assert "leave no room for the answer" in capsys.readouterr().err
    assert main(["eval", str(llama), "--lengths", "20", "--parts", "retrieval", "--tasks", "multikey"]) == 2
    assert "too short" in capsys.readouterr().err
    assert main(["eval", str(llama), "--depths", "1.5"]) == 2
    assert "depths must be in [0, 1]" in capsys.readouterr().err
    assert main(["eval", str(llama), "--text", "/nonexistent.txt", "--parts", "ppl"]) == 2
    assert "held-out text not found" in capsys.readouterr().err
