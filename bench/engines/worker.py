"""One engine per process, driven over JSON lines on stdin/stdout.

The parent sends the engine's options as the first line, then one request per line, {"op": name, ...};
the worker answers each with one line, {"ok": true, ...} or {"ok": false, "error": "..."}. The engine's own
output (logs, progress bars) is moved to stderr, which goes to a log file, so stdout carries only replies.
Timing happens inside the worker: a reply's seconds never include the pipe.

Ops every engine has (Engine below derives decode and prefill from generate):
    greedy    prompts, max_tokens, logprobs=5  -> token_ids [[...]], logprobs [[[(id, logprob)] per step]]
              (one prompt at a time, float32 parity check)
    generate  prompts, max_tokens [per prompt] -> seconds, output_tokens, tok_s (all prompts as one offline job,
              batched the engine's best way; greedy, no end-of-sequence stop)
    decode    prompt, max_tokens               -> tok_s: (max_tokens - 1) / (time(max_tokens) - time(1))
    prefill   prompt                           -> tok_s, seconds: prompt tokens / time to the first token
    memory                                     -> hwm_bytes (VmHWM: the peak RSS of this process image),
                                                  rss_bytes, ru_maxrss_bytes (see memory())
"""
from __future__ import annotations

import json
import os
import resource
import selectors
import subprocess
import sys
import time
import traceback
from pathlib import Path

LOGS = Path(__file__).resolve().parents[1] / ".cache" / "logs"


class Engine:
    """Base of the engine classes run inside workers: subclasses implement generate and greedy."""

    def generate(self, prompts: list[list[int]], max_tokens: list[int]) -> dict:
        raise NotImplementedError

    def greedy(self, prompts: list[list[int]], max_tokens: int, logprobs: int = 5) -> dict:
        raise NotImplementedError

    def decode(self, prompt: list[int], max_tokens: int) -> dict:
        # the 1-token run gets the reversed prompt (same length, same prefill work): the same prompt twice
        # would let an engine with a prefix cache skip the second prefill and inflate the decode rate
        one = self.generate([prompt[::-1]], [1])["seconds"]
        full = self.generate([prompt], [max_tokens])["seconds"]
        return {"tok_s": (max_tokens - 1) / max(full - one, 1e-9), "seconds": full - one}

    def prefill(self, prompt: list[int]) -> dict:
        s = self.generate([prompt], [1])["seconds"]
        return {"tok_s": len(prompt) / s, "seconds": s}

    def memory(self) -> dict:
        return memory()


def memory() -> dict:
    """This process's peak resident memory and current RSS, in bytes. The peak is VmHWM: getrusage's ru_maxrss
    survives fork + exec (a worker started by a big parent reports the parent's peak until it exceeds it),
    while VmHWM belongs to the memory map the exec made; ru_maxrss is kept for reference."""
    out = {"ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    try:
        for line in open("/proc/self/status"):
            key, _, val = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out["hwm_bytes" if key == "VmHWM" else "rss_bytes"] = int(val.split()[0]) * 1024
    except OSError:
        pass
    return out


def serve(factory) -> None:
    """The worker's main loop: factory(**options) builds the engine, then answer ops until stdin closes."""
    reply_fd = os.dup(1)
    os.dup2(2, 1)  # the engine's prints go to stderr (the log); replies go to the saved stdout
    sys.stdout = sys.stderr
    out = os.fdopen(reply_fd, "w", buffering=1)

    def reply(msg: dict) -> None:
        out.write(json.dumps(msg) + "\n")
        out.flush()

    options = json.loads(sys.stdin.readline())
    try:
        t = time.perf_counter()
        engine = factory(**options)
        reply({"ok": True, "load_s": time.perf_counter() - t, **memory()})
    except Exception as e:  # noqa: BLE001 - reported to the parent, which decides
        traceback.print_exc()
        reply({"ok": False, "error": f"{type(e).__name__}: {e}"})
        return
    for line in sys.stdin:
        req = json.loads(line)
        op = req.pop("op")
        try:
            reply({"ok": True, **getattr(engine, op)(**req)})
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            reply({"ok": False, "error": f"{type(e).__name__}: {e}"})


class WorkerError(RuntimeError):
    pass


class Worker:
    """The parent's handle on one engine process (started in __init__; use as a context manager)."""

    def __init__(self, name: str, cmd: list[str], options: dict, timeout: float = 1800.0) -> None:
        self.name, self.cmd, self.options = name, cmd, options
        LOGS.mkdir(parents=True, exist_ok=True)
        self.log_path = LOGS / f"worker-{name}-{os.getpid()}-{time.time_ns() % 10**9}.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                                     text=True, start_new_session=True)
        self.proc.stdin.write(json.dumps(options) + "\n")
        self.proc.stdin.flush()
        self.info = self._read(timeout)  # load_s and memory after loading

    def _read(self, timeout: float | None) -> dict:
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            self.proc.kill()
            self.proc.wait()
            self._log.close()
            raise TimeoutError(f"{self.name}: no answer in {timeout:.0f}s")
        line = self.proc.stdout.readline()
        if not line:
            self.close()
            raise WorkerError(f"{self.name} exited ({self.proc.returncode}):\n{self.log_tail()}")
        msg = json.loads(line)
        if not msg.pop("ok"):
            raise WorkerError(f"{self.name}: {msg['error']}")
        return msg

    def call(self, op: str, timeout: float | None = None, **kw) -> dict:
        """Run one op; TimeoutError (and the worker killed) if it takes longer than timeout seconds."""
        try:
            self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError, OSError) as e:
            raise WorkerError(f"{self.name} is not running ({type(e).__name__})") from e
        return self._read(timeout)

    def log_tail(self, n: int = 3000) -> str:
        if not self._log.closed:  # close() (a worker that exited) has flushed it already
            self._log.flush()
        return self.log_path.read_text()[-n:] if self.log_path.exists() else ""

    def close(self) -> None:
        """Close stdin (the worker exits), then SIGKILL our own process if it has not within 30 s."""
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(30)
            except (subprocess.TimeoutExpired, BrokenPipeError, OSError):
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def __enter__(self) -> "Worker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
