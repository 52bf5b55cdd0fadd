"""bench/quantization.py's tables: the quality table, the docs block and the README summary row, from a record."""
from __future__ import annotations


def _record() -> dict:
    def case(label, precision, metric, ferry, peer, **extra):
        return {"label": label, "dtype": precision, "metric": metric, "higher_is_better": True, **extra,
                "engines": {"ferry": {"median": ferry, "min": ferry, "max": ferry},
                            "llama.cpp": {"median": peer, "min": peer, "max": peer}},
                "ratios": {"llama.cpp": {"median": ferry / peer, "min": ferry / peer, "max": ferry / peer}}}
    cases = [case("decode batch 1", "int8", "tok/s", 30.0, 20.0),
             case("prefill 512 tokens", "int8", "tok/s", 300.0, 200.0, prompt_len=512),
             case("prefill 2048 tokens", "int8", "tok/s", 200.0, 200.0, prompt_len=2048),
             case("32 requests", "int8", "output tok/s", 90.0, 50.0),
             case("decode batch 1", "int4", "tok/s", 30.0, 40.0),
             case("prefill 512 tokens", "int4", "tok/s", 300.0, 100.0, prompt_len=512),
             case("prefill 2048 tokens", "int4", "tok/s", 200.0, 100.0, prompt_len=2048),
             case("32 requests", "int4", "output tok/s", 90.0, 50.0)]
    quality = [{"model": "ferry-tiny", "path": "x", "ppl_tokens": 16384, "precisions": {
        "float32": {"perplexity": 42.57},
        "int8": {"perplexity": 42.58, "perplexity_change": 0.0002, "top1_agreement": 0.993, "positions": 10},
        "int4": {"perplexity": 43.05, "perplexity_change": 0.0112, "top1_agreement": 0.908, "positions": 10}}}]
    return {"scenario": "quantization", "model": "m", "model_name": "qwen2.5-0.5b", "engines": ["ferry", "llama.cpp"],
            "cases": cases, "quality": quality, "machine": {"git": "abc", "cpu": "cpu", "argv": ["bench", "quantization"],
                                                            "transformers": "5", "torch": "2"},
            "config": {"threads": 2, "runs": 3, "quant_dtype": "bfloat16"}}


def test_quality_table_and_docs_block():
    from bench.report import quantization_section
    text = quantization_section(_record())
    assert "| ferry-tiny | 42.570 | 42.580 (+0.02%) | 43.050 (+1.12%) | 99.3% | 90.8% |" in text
    assert "**0.75x**" in text and "python -m bench quantization" in text


def test_summary_row_per_precision_and_goal():
    from bench.summary import quantization_row
    row = quantization_row(_record(), "docs/benchmarks.md#x")
    assert row[1] == "decode batch 1 / prefill 512, 2048 / 32 requests, per precision"
    assert row[2] == "int8: 1.50x / 1.50x, 1.00x / 1.80x; int4: 0.75x / 3.00x, 2.00x / 1.80x"
    assert row[4] == "decode ≥ 1x, prefill ≥ 1x, 32 requests ≥ 1.5x llama.cpp at every precision: not yet"  # int4 decode
