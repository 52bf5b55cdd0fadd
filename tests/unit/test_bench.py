"""bench/ plumbing that needs no engine: interleaving, ratios, README markers, tables with n/a reasons."""
from __future__ import annotations

import math

from bench.common import interleaved, paired
from bench.report import fill, offline_table


def test_interleaved_rotates_who_goes_first():
    order: list[str] = []
    interleaved({n: (lambda n=n: order.append(n) or 1.0) for n in "abc"}, runs=3)
    assert order == list("abc" "bca" "cab")


def test_paired_ratios_are_per_round():
    r = paired({"ferry": [2.0, 4.0, 6.0], "peer": [1.0, 4.0, 2.0]})
    assert r["ratios"]["peer"]["runs"] == [2.0, 1.0, 3.0]
    assert r["ratios"]["peer"]["median"] == 2.0
    assert r["engines"]["ferry"]["min"] == 2.0 and r["engines"]["ferry"]["max"] == 6.0


def test_fill_replaces_only_inside_markers():
    text = "intro\n<!-- BENCH:decode -->\nold\n<!-- /BENCH:decode -->\nprose\n<!-- BENCH:memory -->\nend\n"
    out = fill(text, {"decode": "new table", "memory": "m", "prefill": "no marker: skipped"})
    assert out == ("intro\n<!-- BENCH:decode -->\nnew table\n<!-- /BENCH:decode -->\nprose\n"
                   "<!-- BENCH:memory -->\nm\n<!-- /BENCH:memory -->\nend\n")
    assert fill(out, {"decode": "new table", "memory": "m"}) == out  # idempotent


def test_table_says_why_a_peer_is_missing():
    rec = {"engines": ["ferry", "transformers", "llama.cpp"], "cases": [{
        "label": "prefill 8192 tokens", "dtype": "bfloat16", "metric": "tok/s", "higher_is_better": True,
        "engines": {"ferry": {"median": 400.0, "min": 390.0, "max": 410.0},
                    "transformers": {"unavailable": "over the 600 s limit per run"},
                    "llama.cpp": {"median": 500.0, "min": 480.0, "max": 520.0}},
        "ratios": {"llama.cpp": {"median": 0.8, "min": 0.75, "max": 0.85}, "transformers": {"median": math.nan}}}]}
    table = offline_table(rec)
    assert "| prefill 8192 tokens | bfloat16 | 400 | n/a (1) | 500 | n/a | **0.80x** (0.75–0.85) |" in table
    assert "(1) over the 600 s limit per run" in table


def test_reproduce_command_from_the_recorded_argv():
    from bench.report import command
    assert command({"scenario": "decode", "machine": {"argv": ["/v/bin/ferry", "bench", "decode", "--runs", "3"]}}) \
        == "python -m bench decode --runs 3"
    assert command({"scenario": "memory", "machine": {"argv": ["bench/__main__.py", "all", "--threads", "2"]}}) \
        == "python -m bench memory --threads 2"


def test_links_are_rewritten_relative_to_the_page():
    from bench.report import relink
    text = "![](bench/results/decode.png) [t](docs/benchmarks.md#decode) [w](https://x.org/a) [h](#here)"
    assert relink(text, "README.md") == text
    assert relink(text, "docs/benchmarks.md") == ("![](../bench/results/decode.png) [t](benchmarks.md#decode) "
                                                  "[w](https://x.org/a) [h](#here)")


def test_every_block_lands_in_its_page_and_a_missing_marker_is_reported(tmp_path):
    from bench.report import PAGE_OF, update
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text("top\n<!-- BENCH:summary -->\n<!-- /BENCH:summary -->\n")
    (tmp_path / "docs" / "benchmarks.md").write_text("<!-- BENCH:decode -->\nold\n<!-- /BENCH:decode -->\n")
    missing = update(tmp_path, {"summary": "[t](docs/benchmarks.md#x)", "decode": "![](bench/results/decode.png)",
                                "memory": "no marker anywhere"})
    assert PAGE_OF["decode"] == "docs/benchmarks.md" and missing == ["memory"]
    assert "[t](docs/benchmarks.md#x)" in (tmp_path / "README.md").read_text()
    assert "![](../bench/results/decode.png)" in (tmp_path / "docs" / "benchmarks.md").read_text()


def _offline(ratios: list[dict[str, float]], dtypes: list[str], labels: list[str]) -> dict:
    return {"engines": ["ferry", "transformers", "llama.cpp"], "config": {"threads": 2},
            "machine": {"git": "abc1234", "cpu": "Some CPU"},
            "cases": [{"label": lab, "dtype": d, "ratios": {p: {"median": v} for p, v in r.items()}}
                      for r, d, lab in zip(ratios, dtypes, labels)]}


def test_summary_row_reads_the_ratios_and_judges_the_goal_on_the_main_dtype():
    from bench.summary import offline_row
    rec = _offline([{"llama.cpp": 1.2, "transformers": 1.0}, {"llama.cpp": 0.9, "transformers": 0.8},
                    {"llama.cpp": 0.5, "transformers": 0.4}], ["bfloat16", "bfloat16", "float32"],
                   ["prefill 512 tokens", "prefill 2048 tokens", "prefill 512 tokens"])
    question, case, llama, hf, goal, run = offline_row("prefill", rec, "docs/benchmarks.md#prefill")
    assert case == "prefill 512 / 2048 tokens, bfloat16"
    assert llama == "1.20x / 0.90x (float32: 0.50x)" and hf == "1.00x / 0.80x (float32: 0.40x)"
    assert goal == "≥ 1x llama.cpp: not yet"  # 0.90x at 2048 misses it; float32 is not judged
    assert run == "`abc1234`, Some CPU, 2 threads ([table](docs/benchmarks.md#prefill))"
    rec["cases"][1]["ratios"]["llama.cpp"]["median"] = 1.0
    assert offline_row("prefill", rec, "x")[4] == "≥ 1x llama.cpp: met"


def test_summary_anchor_is_githubs():
    from bench.summary import anchor
    assert anchor("Online serving against llama.cpp's server (qwen2.5-0.5b, bfloat16)") == \
        "online-serving-against-llamacpps-server-qwen25-05b-bfloat16"


def test_committed_pages_are_what_the_report_writes(tmp_path):
    """README.md and docs/ pages hold exactly what `python -m bench report` renders from bench/results/."""
    import shutil

    from bench.report import PAGES, RESULTS, ROOT, render, update
    for page in PAGES:
        (tmp_path / page).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / page, tmp_path / page)
    assert update(tmp_path, render(RESULTS)) == []
    for page in PAGES:
        assert (tmp_path / page).read_text() == (ROOT / page).read_text(), f"{page}: run python -m bench report"


def test_summary_moe_row_says_why_a_peer_has_no_ratio():
    from bench.summary import moe_row
    case = lambda budget, batch, r: {  # noqa: E731
        "budget": budget, "batch": batch, "ratios": {"full / llama.cpp mmap": {"median": r}},
        "configs": {"llama.cpp mmap": {"median": 1.0},
                    "accelerate disk offload": {"unavailable": "over the 120 s limit per call"}}}
    rec = {"machine": {"git": "abc1234", "cpu": "Some CPU"}, "config": {"threads": 2}, "models": {
        "trained": {"model_name": "t", "batches": [1, 16], "cases": [{"budget": 0.25, "batch": 16, "ratios": {},
                                                                      "configs": {"ferry full": {}}}]},
        "random": {"model_name": "olmoe", "batches": [1, 16],
                   "cases": [case(b, B, 2.0 * b) for b in (1.0, 0.5, 0.25, 0.125) for B in (1, 16)]}}}
    row = moe_row(rec, "docs/moe-offload.md")
    assert row[2] == "1.00x / 0.50x / 0.25x"  # batch 16 at 50 / 25 / 12.5%, the random model (the peers ran it)
    assert row[3] == "n/a (over the 120 s limit per call)"
    del rec["models"]["random"]
    assert moe_row(rec, "x") is None


def test_speculative_row_compares_gains_and_judges_issue_20s_goals():
    from bench.summary import speculative_row

    def case(workload, c, ratios, eq=1.0):
        engines = {m: {"equivalence": eq} for m in ["plain", "llama.cpp", *ratios]}
        return {"workload": workload, "concurrency": c, "engines": engines,
                "ratios": {m: {"median": r} for m, r in ratios.items()}}
    rec = {"config": {"dtype": "bfloat16", "threads": 2}, "machine": {"git": "abc", "cpu": "X"},
           "cases": [case("grounded", 1, {"ngram": 2.1, "draft": 1.0, "llama.cpp-ngram": 1.5}),
                     case("open", 1, {"draft": 1.2, "llama.cpp-draft": 0.7}),
                     case("open", 16, {"ngram": 0.96, "llama.cpp-ngram": 0.9})]}
    row = speculative_row(rec, "docs/speculative.md")
    assert "grounded at 1: 2.10x vs 1.50x" in row[1] and "open at 16: 0.96x vs 0.90x" in row[1]
    assert row[4] == ("gain ≥ llama.cpp's in every case: met; ≥ 0.97x at 16 on every workload: not yet; n-gram or "
                      "phrase ≥ 2x, grounded at 1: met; draft ≥ 1.3x, open at 1: not yet; greedy output identical: met")
