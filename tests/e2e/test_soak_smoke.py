"""`python -m bench soak --smoke` (about a minute): the abuse campaign at a tiny size finds no anomaly, and leaves
the server idle (no KV block held, nothing running or waiting). The full size runs by hand (bench/README.md)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.e2e.conftest import REPO_ROOT


def test_soak_smoke_has_no_anomaly():
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    run = subprocess.run([sys.executable, "-m", "bench", "soak", "--smoke"], cwd=REPO_ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    record = json.loads((REPO_ROOT / "bench/.cache/smoke/soak.json").read_text())
    assert record["anomalies"] == 0, run.stdout
    assert all(v == 0 for v in record["idle_after"].values()), record["idle_after"]
    burst = next(p for p in record["phases"] if p["phase"] == "burst")
    assert burst["outcomes"] == {"200": 24, "429": 76}, burst
    assert {p["phase"] for p in record["phases"]} == {"mixed", "burst", "bad", "slow", "tokenize", "sigterm", "sigkill"}
