"""`python -m bench fairness --smoke` (a few minutes): the scenario runs end to end against real servers and
records what it promises (per-client shares, TTFT, Jain's index, preemptions, the swap copy cost), the servers end
idle (no KV block held), and fair actually preempted for fairness. The full size runs by hand (bench/README.md)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.e2e.conftest import REPO_ROOT


def test_fairness_smoke_records_every_config():
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    run = subprocess.run([sys.executable, "-m", "bench", "fairness", "--smoke"], cwd=REPO_ROOT, env=env,
                         capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    record = json.loads((REPO_ROOT / "bench/.cache/smoke/fairness.json").read_text())
    assert set(record["configs"]) == {"fcfs", "fair", "fair-swap"}
    for name, c in record["configs"].items():
        assert set(c["clients"]) == {"flood", "light-0", "light-1"}, name
        assert all(r["requests"] > 0 and r["tok_s"] > 0 for r in c["clients"].values()), (name, c["clients"])
        assert abs(sum(r["share"] for r in c["clients"].values()) - 1) < 1e-6
        assert 0 < c["jain"] <= 1 + 1e-9
        assert all(v == 0 for v in c["idle_after"].values()), (name, c["idle_after"])
    assert record["configs"]["fcfs"]["num_fair_preemptions"] == 0
    assert record["configs"]["fair"]["num_fair_preemptions"] > 0
    copies = record["swap_copy"]
    assert {(r["blocks"], r["layout"]) for r in copies} == {(8, "contiguous"), (8, "scattered"), (32, "contiguous"),
                                                            (32, "scattered")}
    assert all(r["runs"] == 1 for r in copies if r["layout"] == "contiguous")
    assert (REPO_ROOT / "bench/.cache/smoke/fairness.png").stat().st_size > 0
