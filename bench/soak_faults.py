"""The soak campaign's socket and process faults (slow sockets, a /tokenize flood, SIGTERM and SIGKILL with
streams in flight) and its report (table + PNG)."""
from __future__ import annotations

import ast
import asyncio
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from bench.soak_server import Phase, SoakServer

STREAM = {"prompt": "The storm", "max_tokens": 64, "temperature": 0, "ignore_eos": True, "stream": True}


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):
            pass
        return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def slow_sockets(server: SoakServer, n: int, header_timeout: float, body_timeout: float) -> Phase:
    """n sockets that dribble header bytes and n that send half a body, at once: all closed by the deadlines."""
    phase = Phase("slow")
    half = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000"
            b"\r\n\r\n{\"prompt\": \"abcdefgh")
    socks = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(2 * n)]
    for s in socks[n:]:
        s.sendall(half)
    stop = threading.Event()

    def dribble(s: socket.socket) -> None:
        for byte in b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 1000:
            if stop.is_set():
                return
            try:
                s.sendall(bytes([byte]))
            except OSError:
                return
            time.sleep(0.2)

    threads = [threading.Thread(target=dribble, args=(s,), daemon=True) for s in socks[:n]]
    for t in threads:
        t.start()
    for i, s in enumerate(socks):
        kind = "slow-header" if i < n else "half-body"
        closed = _closed_within(s, max(header_timeout, body_timeout) + 10)
        phase.record(f"{kind} closed" if closed else f"{kind} open", None if closed else f"{kind} socket left open")
        s.close()
    stop.set()
    return phase


# /health is timed from its own process: timed from the flooding client's event loop, the wait included that
# loop's own work on 100 requests (what the client did, not how fast the server answered).
_PROBE = """
import sys, time, httpx, select
times = []
with httpx.Client(timeout=30) as c:
    while not select.select([sys.stdin], [], [], 0.02)[0]:
        t = time.monotonic()
        status = c.get(sys.argv[1] + "/health").status_code
        times.append((time.monotonic() - t, status))
print(repr(times))
"""


async def flood(server: SoakServer, n: int) -> tuple[Phase, float]:
    """n concurrent /tokenize calls of ~30k characters while /health is timed: (phase, slowest /health in ms)."""
    phase = Phase("tokenize")
    text = "Lily and Tom went to the park. " * 1000
    probe = subprocess.Popen([sys.executable, "-c", _PROBE, server.url], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)
    await asyncio.sleep(0.5)  # the probe's interpreter and first connection are up before the flood starts
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=n + 4)) as client:
        async def tok() -> None:
            try:
                r = await client.post(server.url + "/tokenize", json={"prompt": text})
                s = str(r.status_code)
            except httpx.HTTPError as e:
                s = f"error {type(e).__name__}"
            phase.record(s, None if s in ("200", "429") else f"/tokenize answered {s}")

        await asyncio.gather(*(tok() for _ in range(n)))
    times = ast.literal_eval(probe.communicate("stop\n", timeout=60)[0])
    slowest = max(t for t, _ in times)
    for _, status in times:
        if status != 200:
            phase.anomalies.append(f"/health answered {status} during the flood")
    if slowest > 0.1:
        phase.anomalies.append(f"/health took {1000 * slowest:.0f} ms during the flood (target < 100 ms)")
    return phase, 1000 * slowest


def _streams(url: str, k: int) -> tuple[list[threading.Thread], list[list[str]], threading.Event]:
    """k streaming completions on threads; each appends its lines; started is set at the first line."""
    outs: list[list[str]] = [[] for _ in range(k)]
    started = threading.Event()

    def run(lines: list[str]) -> None:
        try:
            with httpx.stream("POST", url + "/v1/completions", json=STREAM, timeout=120) as r:
                for line in r.iter_lines():
                    started.set()
                    lines.append(line)
        except httpx.HTTPError as e:
            lines.append(f"error {type(e).__name__}")

    threads = [threading.Thread(target=run, args=(o,), daemon=True) for o in outs]
    for t in threads:
        t.start()
    return threads, outs, started


def sigterm_in_flight(server: SoakServer) -> Phase:
    phase = Phase("sigterm")
    threads, outs, started = _streams(server.url, 4)
    started.wait(60)
    time.sleep(0.3)
    code, took = server.stop()
    for t in threads:
        t.join(30)
    for lines in outs:
        done = "data: [DONE]" in lines
        phase.record("stream completed" if done else "stream cut", None if done else "a stream cut by SIGTERM")
    log = server.log()
    phase.record(f"exit {code}", None if code == 0 else f"exit code {code} after SIGTERM ({took:.1f} s)")
    for bad in ("Traceback", "CancelledError", '" 500'):
        if bad in log:
            phase.anomalies.append(f"{bad!r} in the log after SIGTERM")
    return phase


def sigkill_restart(model: str, flags: tuple[str, ...]) -> Phase:
    phase = Phase("sigkill")
    import signal
    with SoakServer(model, flags) as server:
        threads, _, started = _streams(server.url, 4)
        started.wait(60)
        code, _ = server.stop(signal.SIGKILL)
        phase.record(f"killed ({code})")
        for t in threads:
            t.join(30)
    with SoakServer(model, flags) as server:
        r = httpx.post(server.url + "/v1/completions", json={"prompt": "Lily", "max_tokens": 4}, timeout=120)
        phase.record(f"restart {r.status_code}", None if r.status_code == 200 else f"after restart: {r.status_code}")
    return phase


def report(record: dict, png: Path) -> str:
    """The table (markdown) and the PNG (outcomes per phase, anomalies marked)."""
    lines = ["| phase | sent | outcomes | anomalies | RSS after (MB) |", "|---|---:|---|---:|---:|"]
    for p in record["phases"]:
        outcomes = ", ".join(f"{k}: {v}" for k, v in p["outcomes"].items() if v)
        rss = f"{p['rss_mb']:.0f}" if p.get("rss_mb") else ""
        lines.append(f"| {p['phase']} | {p['sent']} | {outcomes} | {p['anomalies']} | {rss} |")
    idle = record["idle_after"]
    lines += ["", f"RSS before/after: {record['rss_before_mb']:.0f} / {record['rss_after_mb']:.0f} MB "
              f"({record['rss_growth_pct']:+.1f}%; after each mixed round: "
              f"{', '.join(f'{v:.0f}' for v in record['rss_rounds_mb'])}) · KV blocks after: {idle['ferry_kv_blocks_used']:.0f} · "
              f"running/waiting after: {idle['ferry_num_requests_running']:.0f}/"
              f"{idle['ferry_num_requests_waiting']:.0f} · slowest /health in the flood: "
              f"{record['health_max_ms']:.0f} ms · anomalies: {record['anomalies']} · {record['seconds']:.0f} s"]
    for p in record["phases"]:
        for ex in p["examples"]:
            lines.append(f"- {p['phase']}: {ex}")
    _plot(record, png)
    return "\n".join(lines)


def _plot(record: dict, png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    phases = record["phases"]
    fig, ax = plt.subplots(figsize=(9, 4))
    bottoms = [0] * len(phases)
    keys = sorted({k for p in phases for k, v in p["outcomes"].items() if v})
    for key in keys:
        vals = [p["outcomes"].get(key, 0) for p in phases]
        ax.bar([p["phase"] for p in phases], vals, bottom=bottoms, label=key)
        bottoms = [b + v for b, v in zip(bottoms, vals)]
    for i, p in enumerate(phases):
        ax.text(i, bottoms[i], f"{p['anomalies']} anomalies", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("requests / sockets")
    ax.set_title(f"ferry soak: RSS {record['rss_before_mb']:.0f} -> {record['rss_after_mb']:.0f} MB, "
                 f"{record['anomalies']} anomalies")
    ax.legend(fontsize=6, ncol=3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
