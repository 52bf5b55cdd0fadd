"""bench/moe_offload.py (+ moe_configs, moe_report) and bench/memlimit.py: ratios per round, the README table,
memory limits, a smoke run."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from bench import memlimit
from bench.common import SMOKE
from bench.moe_configs import AUTO_BITS, FERRY_MODES, INT4_FULL, INT4_REFERENCE, REFERENCE
from bench.moe_report import add_bound, add_ratios, markdown


def _m(tok_s: float, rnd: int) -> dict:
    return {"tok_s": tok_s, "round": rnd}


def test_ratios_pair_the_same_round():
    case = {"configs": {"ferry full": {"measurements": [_m(10, 0), _m(30, 1)]},
                        REFERENCE: {"measurements": [_m(20, 0), _m(30, 1)]},
                        "llama.cpp mmap": {"measurements": [_m(5, 1)]},  # round 0 failed: only round 1 pairs
                        "accelerate disk offload": {"unavailable": "killed at the 300 MiB memory limit"}}}
    add_ratios(case)
    assert case["ratios"]["full / ferry in-memory"]["runs"] == [0.5, 1.0]
    assert case["ratios"]["full / llama.cpp mmap"]["runs"] == [6.0]
    assert "full / accelerate disk offload" not in case["ratios"]


def test_auto_is_paired_with_the_fixed_setting_of_the_best_median_round_by_round():
    # not the fastest fixed setting of each round (round 0: on-demand, round 1: lru+prefetch), whose noise maxima
    # no real setting reaches: the one of the best median (lru+prefetch, 15.5 against 13 and 8), in each round
    case = {"configs": {"ferry auto": {"measurements": [_m(9, 0), _m(20, 1)]},
                        "ferry on-demand": {"measurements": [_m(10, 0), _m(16, 1)]},
                        "ferry lru+prefetch": {"measurements": [_m(6, 0), _m(25, 1)]},
                        "ferry full": {"measurements": [_m(8, 0)]},  # round 1 failed
                        REFERENCE: {"measurements": [_m(30, 0), _m(40, 1)]}}}
    add_ratios(case)
    assert case["best_fixed"] == "ferry lru+prefetch"
    assert case["ratios"]["auto / best fixed"]["runs"] == [1.5, 0.8]
    assert case["ratios"]["auto / on-demand"]["runs"] == [0.9, 1.25]
    assert case["ratios"]["auto / ferry in-memory"]["runs"] == [0.3, 0.5]


def test_table_shows_reasons_ratios_and_inexact_tokens():
    full = {"median": 8.0, "min": 8.0, "max": 8.0, "runs": [8.0], "hit_rate": 0.5, "prefetch_precision": 0.75,
            "prefetch_recall": 0.6, "expert_bytes_per_token": 2**20, "stall_ms_per_token": 3.0,
            "disk_bytes_per_token": 2**20, "token_exact": False, "measurements": [_m(8.0, 0)]}
    case = {"budget": 0.25, "batch": 16, "configs": {
        REFERENCE: {"median": 16.0, "runs": [16.0], "measurements": [_m(16.0, 0)]}, "ferry full": full,
        "accelerate disk offload": {"unavailable": "over the 600 s limit per call"}}}
    add_ratios(case)
    rec = {"config": {"threads": 2, "dtype": "bfloat16", "runs": 1},
           "machine": {"argv": ["bench", "moe-offload", "--runs", "1"], "git": "abc", "torch": "t", "transformers": "x"},
           "models": {"random": {"model_name": "m", "expert_bytes": 2**30, "nonexpert_bytes": 2**28, "new_tokens": 8,
                                 "memory_limit": "cgroup", "cases": [case]}}}
    text = markdown(rec)
    assert "| 16 | 25% | 16.0 | 8.00 (not exact!) | n/a (1) | **0.50x** |" in text
    assert "(1) over the 600 s limit per call" in text
    assert "| 16 | 25% | 50% | 75% | 60% | 1.00 | 3.00 |" in text
    assert "python -m bench moe-offload --runs 1" in text


def _bound(lookups: float, slowdown: dict) -> float:
    """1 s in-memory steps (16 tok/s at batch 16), records of 1 MB read at 10 MB/s, 4 slots."""
    case = {"batch": 16, "ratios": {}, "configs": {
        REFERENCE: {"median": 16.0},
        "ferry full": {"median": 4.0, "lookups_per_step": lookups, "num_slots": 4, "expert_bytes_per_token": 0.0}}}
    add_bound(case, {"disk": {"bytes_per_s": 1e7, "record_bytes": 1e6}, "interference": {"slowdown": slowdown}})
    return case["bound"]["ratio"]


def test_bound_counts_compute_slowed_by_reads():
    assert _bound(10, {}) == 1.0  # 0.6 s of reads hide under 1 s of compute
    assert _bound(10, {16: 0.5}) == pytest.approx(1 / 1.2)  # 0.6 s of reads slow that compute by a third of 0.6 s
    assert _bound(10, {"16": 0.5}) == pytest.approx(1 / 1.2)  # as read back from the JSON
    assert _bound(34, {16: 0.5}) == pytest.approx(1 / 3)  # 3 s of reads: compute (1.5 s at worst) hides under them


@pytest.mark.skipif(memlimit.available() is not None, reason=f"no writable memory cgroup: {memlimit.available()}")
def test_memory_limit_kills_a_process_over_it():
    code = "b = bytearray(256 << 20); b[::4096] = b'x' * len(b[::4096])"
    with memlimit.MemoryLimit(96 << 20, "test") as lim:
        over = subprocess.run([*lim.prefix, sys.executable, "-c", code], check=False)
        assert over.returncode != 0 and lim.failcnt > 0
    with memlimit.MemoryLimit(512 << 20, "test") as lim:
        assert subprocess.run([*lim.prefix, sys.executable, "-c", code], check=False).returncode == 0
        assert lim.peak_bytes >= 256 << 20
    assert not lim.path.exists()


def test_drop_cache_counts_the_files(tmp_path):
    (tmp_path / "a").write_bytes(b"x" * 5000)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b").write_bytes(b"y" * 3000)
    assert memlimit.drop_cache([tmp_path]) == 8000
    assert memlimit.drop_cache([tmp_path / "a", tmp_path / "missing"]) == 5000


def test_smoke_run_is_token_exact_and_counts(tmp_path):
    """ferry alone on the tiny OLMoE at a 25% budget: every mode gives the in-memory tokens (int4: the int4
    store's in-memory tokens), counters filled."""
    from bench import moe_offload
    moe_offload.main(["--smoke", "--engines", "ferry", "--no-parity", "--no-limit", "--trained", "none",
                      "--budgets", "0.25", "--batches", "2", "--klotski", "1", "--out", "moe_offload-test"])
    rec = json.loads((SMOKE / "moe_offload-test.json").read_text())
    (case,) = rec["models"]["random"]["cases"]
    for mode in [*FERRY_MODES, INT4_FULL]:
        c = case["configs"][mode]
        assert c["token_exact"] is True, mode
        # a few smoke tokens can time at or under the one-token run on a busy machine: nan exactly then
        for m in c["measurements"]:
            assert m["tok_s"] > 0 if m["seconds"] > 0 else math.isnan(m["tok_s"]), (mode, m)
        assert 0 <= c["hit_rate"] <= 1 and c["expert_bytes_per_token"] > 0
    assert case["configs"]["ferry lru+prefetch"]["prefetch_precision"] is not None
    # the batch in sequential groups of 1, checked against the in-memory run of the same groups
    assert case["configs"]["ferry full, groups of 1"]["token_exact"] is True
    assert "token_exact" not in case["configs"]["ferry in-memory, groups of 1"]
    assert "token_exact" not in case["configs"][INT4_REFERENCE]  # lossy: measured against bf16, not required
    assert 0 <= case["configs"][INT4_REFERENCE]["sequences_as_lossless"] <= 1
    auto = case["configs"][AUTO_BITS]  # --expert-bits auto at the budget's size: lossy, its agreement measured
    assert "token_exact" not in auto and 0 <= auto["sequences_as_lossless"] <= 1 and auto["hit_rate"] > 0
    # a ratio exists only where both rows have a speed
    if math.isfinite(case["configs"][REFERENCE]["median"]):
        assert "int4 full / ferry in-memory (lossy)" in case["ratios"]
    assert (SMOKE / "moe_offload-test.png").is_file()
