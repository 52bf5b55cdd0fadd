"""`ferry serve --instances 2` (Ray, one thread each): requests are spread over both instances, and when one
instance's process is killed (SIGKILL) during 16 streams, every stream still ends with the tokens it would have
had (resumed on the other instance from the tokens it had), and the dead instance comes back."""
from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import pytest

pytest.importorskip("ray")

PROMPTS = [f"w{3 + i} w{40 + 3 * i} w{7 + i}" for i in range(16)]
BODY = {"max_tokens": 160, "temperature": 0, "ignore_eos": True}


def _instance_pids() -> list[int]:
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                cmd = open(f"/proc/{d}/cmdline", "rb").read()
            except OSError:
                continue
            if cmd.startswith(b"ray::EngineInstance"):
                pids.append(int(d))
    return pids


@pytest.fixture(scope="module")
def cluster(start_server):
    return start_server("--instances", "2")


def _stream(url: str, prompt: str, lines: list[dict], started: threading.Barrier) -> None:
    with httpx.stream("POST", url + "/v1/completions", json={**BODY, "prompt": prompt, "stream": True,
                                                            "stream_options": {"include_usage": True}},
                      timeout=300) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                lines.append(json.loads(line[6:]))
                if len(lines) == 1:
                    started.wait(120)


def test_a_killed_instance_loses_no_request(cluster):
    want = {p: httpx.post(cluster.url + "/v1/completions", json={**BODY, "prompt": p}, timeout=300).json()
            ["choices"][0]["text"] for p in PROMPTS}
    pids = _instance_pids()
    assert len(pids) == 2, pids
    outs: list[list[dict]] = [[] for _ in PROMPTS]
    started = threading.Barrier(len(PROMPTS) + 1)  # every stream has its first token, none can have finished
    threads = [threading.Thread(target=_stream, args=(cluster.url, p, o, started)) for p, o in zip(PROMPTS, outs)]
    for t in threads:
        t.start()
    started.wait(120)
    os.kill(pids[0], signal.SIGKILL)
    for t in threads:
        t.join(300)
    for prompt, lines in zip(PROMPTS, outs):
        text = "".join(c["text"] for line in lines for c in line.get("choices", []))
        assert "error" not in json.dumps(lines[-1]), lines[-1]
        assert text == want[prompt], prompt
    assert "resumes on another one" in cluster.log()
    deadline = time.monotonic() + 120
    while len(_instance_pids()) < 2 and time.monotonic() < deadline:
        time.sleep(1)
    assert len(_instance_pids()) == 2 and pids[0] not in _instance_pids()
    deadline = time.monotonic() + 10  # the front end reads the instances' state once a second
    while time.monotonic() < deadline:
        metrics = httpx.get(cluster.url + "/metrics").text
        alive = [float(l.split()[-1]) for l in metrics.splitlines() if l.startswith("ferry_instance_alive{")]
        restarts = [float(l.split()[-1]) for l in metrics.splitlines() if l.startswith("ferry_instance_restarts_total{")]
        if alive == [1.0, 1.0] and sum(restarts) == 1:
            break
        time.sleep(0.5)
    assert alive == [1.0, 1.0] and sum(restarts) == 1, metrics
    used = [float(l.split()[-1]) for l in metrics.splitlines() if l.startswith("ferry_kv_blocks_used{")]
    assert used == [0.0], used


def test_without_ray_the_flag_says_what_to_install(monkeypatch, model_path):
    import sys

    from ferry.cluster.frontend import ClusterLLM
    from ferry.errors import InvalidRequest
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(InvalidRequest, match="--instances.*pip install ray"):
        ClusterLLM(str(model_path), 2, {})
