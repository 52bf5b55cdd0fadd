"""`python -m bench cluster --smoke` (a few minutes): every part of the scenario runs and records what it measures
(1 x 2 threads vs 2 x 1 thread, the front end's cost against no Ray, the imbalanced trace with and without the
balance policy, migrations by length with their pause and client gap, the per-block copy cost, the prefill/decode
split), each migration and each split request moved. The full size runs by hand (the lead's
quiet machine)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.e2e.conftest import REPO_ROOT

pytest.importorskip("ray")


def test_cluster_smoke_records_every_measure():
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    run = subprocess.run([sys.executable, "-m", "bench", "cluster", "--smoke"], cwd=REPO_ROOT, env=env,
                         capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    record = json.loads((REPO_ROOT / "bench/.cache/smoke/cluster.json").read_text())
    for key in ("one_instance_2_threads", "two_instances_1_thread", "split_prefill_1_decode_1", "imbalanced_off",
                "imbalanced_balance", "prefix_least-loaded", "prefix_cache-aware"):
        r = record[key]
        assert r["output_tok_s"] > 0 and 0 < r["ttft_p50_s"] <= r["ttft_p99_s"] and r["itl_p50_s"] <= r["itl_p99_s"]
    f = record["front_end"]
    assert f["ray_1_instance"]["output_tok_s"] > 0 and f["throughput_ratio"] > 0
    assert record["ray_memory_bytes"] > 10 * 2**20  # the GCS and the raylet, at least
    assert record["imbalanced_off"]["migrations"] == {}  # no policy, no move
    # 2 system prompts, 8 requests: cache-aware sends each prompt where its prefix is, so most prompt tokens hit
    hits = {p: record[f"prefix_{p}"]["prefix_cache_hit_rate"] for p in ("least-loaded", "cache-aware")}
    assert hits["cache-aware"] > 0 and hits["cache-aware"] >= hits["least-loaded"], hits
    assert [(m["model"], m["prompt_tokens"]) for m in record["migrations"]] == [
        ("ferry-tiny", 32), ("ferry-tiny", 96), ("tiny-qwen2", 32), ("tiny-qwen2", 96)]
    assert all(m["outcome"] == "migrated" and m["blocks"] >= m["prompt_tokens"] // 16 and m["pause_ms"] > 0
               for m in record["migrations"]), record["migrations"]
    assert record["split_handovers"].get("migrated") == 8  # every request of the trace (8) went prefill -> decode
    assert record["copy_cost"]["bytes_per_block"] == 4 * 2 * 16 * 2 * 64 * 4  # layers, K/V, tokens, heads, dim, f32
    assert (REPO_ROOT / "bench/.cache/smoke/cluster.png").exists()
