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
