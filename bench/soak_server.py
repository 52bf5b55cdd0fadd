"""One `python -m ferry.server` process for the soak campaign: start on a free port, wait for /health, read its
RSS (/proc) and its gauges (/metrics), stop it with a signal and report how it ended; `Phase`, one phase's
outcomes and anomalies."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
GAUGES = ("ferry_num_requests_running", "ferry_num_requests_waiting", "ferry_kv_blocks_used")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SoakServer:
    def __init__(self, model: str, flags: tuple[str, ...], startup_timeout: float = 900.0) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(tempfile.mkstemp(prefix="ferry-soak-", suffix=".log")[1])
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "ferry.server", model, "--port", str(self.port), *flags],
                                     stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        deadline = time.monotonic() + startup_timeout  # a first start may build kernels (minutes)
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ferry serve exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop(signal.SIGKILL)
        raise RuntimeError(f"ferry serve not ready after {startup_timeout} s:\n{self.log()}")

    def __enter__(self) -> "SoakServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def rss_mb(self) -> float:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024

    def gauges(self) -> dict[str, float]:
        text = httpx.get(self.url + "/metrics", timeout=10).text
        out = {}
        for name in GAUGES:
            m = re.search(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M)
            out[name] = float(m.group(1)) if m else float("nan")
        return out

    def wait_idle(self, timeout: float = 60.0) -> dict[str, float]:
        """The gauges once nothing runs, waits or holds a KV block (or the last reading at timeout)."""
        deadline = time.monotonic() + timeout
        while True:
            g = self.gauges()
            if all(v == 0 for v in g.values()) or time.monotonic() > deadline:
                return g
            time.sleep(0.1)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> tuple[int | None, float]:
        """(exit code, seconds it took); a process that does not exit within timeout is killed (code None)."""
        start = time.monotonic()
        code: int | None = self.proc.poll()
        if code is None:
            self.proc.send_signal(sig)
            try:
                code = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if not self._log.closed:
            self._log.close()
        return code, time.monotonic() - start


class Phase:
    """Outcomes and anomalies of one phase."""

    def __init__(self, name: str) -> None:
        self.name, self.sent, self.outcomes, self.anomalies = name, 0, Counter(), []
        self.rss_mb: float | None = None  # the server's RSS after the phase

    def record(self, outcome: str, anomaly: str | None = None) -> None:
        self.sent += 1
        self.outcomes[outcome] += 1
        if anomaly:
            self.anomalies.append(anomaly)

    def row(self) -> dict:
        return {"phase": self.name, "sent": self.sent, "outcomes": dict(sorted(self.outcomes.items())),
                "anomalies": len(self.anomalies), "examples": self.anomalies[:5], "rss_mb": self.rss_mb}
