"""HTTP servers under test, each a subprocess on loopback that the benchmark starts, waits for and stops.

Three engines speak OpenAI's /v1/completions with streaming:
- ferry:            `python -m ferry.server` (the main venv), token-id prompts, ignore_eos + min_tokens (so the
                    end-of-sequence token is masked, as llama.cpp's ignore_eos does);
- llama.cpp:        llama.cpp's `llama-server` (built by bench/peers/env.py), `--parallel` slots with continuous
                    batching, token-id prompts, ignore_eos (which masks end-of-generation tokens);
- llama-cpp-python: `python -m llama_cpp.server` (the peers venv): one request at a time (it serialises requests
                    behind a lock; --interrupt_requests False so a new request waits instead of cutting the
                    running one off), text prompts only, min_tokens to run to max_tokens.
Weights stay in anonymous memory in every engine (ferry copies them; the llama.cpp ones get no-mmap flags):
the host drops idle file-backed pages (DESIGN.md), which would bill one engine for disk reads.
"""
from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

KV_TYPES = {"f32": 0, "f16": 1}   # GGML_TYPE_*, as llama-cpp-python's server takes them
LOGS = Path(__file__).resolve().parents[1] / ".cache" / "logs"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """One server process. `prompt_as_text`: the server takes text prompts only (words "w<id>")."""
    name: str
    cmd: list[str]
    port: int
    health_path: str = "/health"
    prompt_as_text: bool = False
    extra_body: dict = field(default_factory=dict)   # engine-specific request fields (ignore_eos, ...)
    min_tokens: bool = False                          # send min_tokens = max_tokens (no end-of-sequence)
    busy_metrics: tuple[str, ...] = ()                # Prometheus gauges that are 0 when the server is idle
    proc: subprocess.Popen | None = None
    log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 900.0) -> "Server":
        LOGS.mkdir(parents=True, exist_ok=True)
        self.log_path = LOGS / f"{self.name}-{self.port}.log"
        log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + self.health_path, timeout=2.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"{self.name} not healthy after {timeout:.0f}s:\n{self.log_tail()}")

    def stop(self) -> None:
        """SIGTERM to the process we started (its own session), SIGKILL after 30 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def log_tail(self, n: int = 3000) -> str:
        return self.log_path.read_text()[-n:] if self.log_path and self.log_path.exists() else ""

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def ferry(model: str | Path, dtype: str, threads: int, max_num_seqs: int, extra_args: list[str] | None = None) -> Server:
    port = free_port()
    cmd = [sys.executable, "-m", "ferry.server", str(model), "--port", str(port), "--threads", str(threads),
           "--dtype", dtype, "--max-num-seqs", str(max_num_seqs), "--served-model-name", "bench", *(extra_args or [])]
    return Server("ferry", cmd, port, extra_body={"ignore_eos": True}, min_tokens=True,
                  busy_metrics=("ferry_num_requests_running", "ferry_num_requests_waiting"))


def llama_server(gguf: str | Path, threads: int, parallel: int, ctx_per_slot: int, kv_type: str = "f16",
                 extra_args: list[str] | None = None) -> Server:
    from bench.peers.env import llama_server as binary
    port = free_port()
    cmd = [str(binary()), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
           "-t", str(threads), "-tb", str(threads), "-np", str(parallel), "-c", str(parallel * ctx_per_slot),
           "-ctk", kv_type, "-ctv", kv_type, "--load-mode", "none", "-ngl", "0", "--no-webui", "--metrics",
           *(extra_args or [])]
    return Server("llama.cpp", cmd, port, extra_body={"ignore_eos": True},
                  busy_metrics=("llamacpp:requests_processing", "llamacpp:requests_deferred"))


def llama_cpp_python(gguf: str | Path, threads: int, n_ctx: int, kv_type: str = "f16",
                     extra_args: list[str] | None = None) -> Server:
    from bench.peers.env import peer_python
    port = free_port()
    cmd = [peer_python(), "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1", "--port", str(port),
           "--n_threads", str(threads), "--n_threads_batch", str(threads), "--n_ctx", str(n_ctx),
           "--interrupt_requests", "False", "--use_mmap", "False",
           "--type_k", str(KV_TYPES[kv_type]), "--type_v", str(KV_TYPES[kv_type]), *(extra_args or [])]
    # its requests default to repeat_penalty 1.1, which changes greedy tokens; llama-server's default is 1.0
    return Server("llama-cpp-python", cmd, port, health_path="/v1/models", prompt_as_text=True,
                  extra_body={"repeat_penalty": 1.0}, min_tokens=True)

