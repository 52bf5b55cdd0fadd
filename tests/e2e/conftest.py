"""Real servers for the end-to-end tests: `python -m ferry.server` in a subprocess on a free loopback port, over a
tiny random llama checkpoint (tests/checkpoints.py), talked to with the official openai package and httpx.

Servers run single-threaded (--threads 1): on a busy 2-core machine OpenMP spin-waiting makes tiny matmuls
orders of magnitude slower with 2 threads."""
from __future__ import annotations

import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.checkpoints import make_checkpoint

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
BASE_FLAGS = ("--threads", "1", "--kv-cache-memory", "16M")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One `python -m ferry.server` process. url is http://127.0.0.1:PORT; log() is what it printed."""

    def __init__(self, model: pathlib.Path, *flags: str, log_path: pathlib.Path, host_flag: bool = True,
                 startup_timeout: float = 180.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.model = str(model)
        self.log_path = log_path
        self.api_key = flags[flags.index("--api-key") + 1] if "--api-key" in flags else None
        args = [sys.executable, "-m", "ferry.server", self.model, "--port", str(self.port), *BASE_FLAGS, *flags]
        if host_flag:
            args += ["--host", "127.0.0.1"]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT)
        self._wait_ready(startup_timeout)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        else:
            self.stop()
            raise RuntimeError(f"server not ready after {timeout} s:\n{self.log()}")
        # Warm up: the first forward may compile ferry's CPU kernels (minutes, once per source change); tests
        # should time the server, not the compiler.
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        deadline = time.monotonic() + 900
        while True:
            r = httpx.post(self.url + "/v1/completions", json={"prompt": "warm up", "max_tokens": 2},
                           headers=headers, timeout=900)
            if r.status_code != 408 or time.monotonic() > deadline:  # 408: a server with a short --request-timeout
                break
        assert r.status_code == 200, r.text

    def log(self) -> str:
        if not self._log.closed:  # stop() closes it
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics as {name{labels}: value} (names as the parser reports them)."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        out = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "model_name")
                out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        return out

    def wait_idle(self, timeout: float = 10.0) -> dict[str, float]:
        """Metrics once no request runs or waits and no KV block is held (or the last scrape at timeout)."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            idle = m["ferry_num_requests_running"] == 0 and m["ferry_num_requests_waiting"] == 0 \
                and m["ferry_kv_blocks_used"] == 0
            if idle or time.monotonic() > deadline:
                return m
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@pytest.fixture(scope="session")
def model_path(tmp_ckpt_dir: pathlib.Path) -> pathlib.Path:
    return make_checkpoint("llama", tmp_ckpt_dir)


@pytest.fixture(scope="session")
def start_server(model_path: pathlib.Path, tmp_path_factory: pytest.TempPathFactory):
    """start_server(*flags, host_flag=True) -> Server; every server is stopped at the end of the session."""
    servers: list[Server] = []

    def start(*flags: str, host_flag: bool = True) -> Server:
        log_path = tmp_path_factory.mktemp("server") / "server.log"
        server = Server(model_path, *flags, log_path=log_path, host_flag=host_flag)
        servers.append(server)
        return server

    yield start
    for s in servers:
        s.stop()


@pytest.fixture(scope="session")
def server(start_server) -> Server:
    """The default server, shared by the tests that do not need special flags."""
    return start_server("--served-model-name", "tiny-llama")


@pytest.fixture(scope="session")
def offline_llm(model_path: pathlib.Path):
    """ferry.LLM over the same checkpoint, in this process (the reference for greedy outputs)."""
    import ferry

    llm = ferry.LLM(str(model_path), threads=1, kv_cache_memory="16M")
    llm.generate(["warm up"], use_tqdm=False)
    return llm
