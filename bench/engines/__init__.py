"""The engines under test, each in its own process behind one small protocol (see worker.py).

    ferry          ferry.LLM (main venv)
    transformers   Hugging Face `generate` on the same safetensors (main venv)
    llama.cpp      libllama through llama-cpp-python's low-level API, the same weights as GGUF at the same
                   precision (the peers venv in bench/.cache/peers, see bench/peers/env.py)

`start(name, model_dir, dtype, threads, **options)` returns a running `Worker`; its ops are the same for all
three, so a scenario never asks which engine it is talking to. No torch import here: llama.cpp's worker
imports this package from the peers venv."""
from __future__ import annotations

from pathlib import Path

from bench.engines.worker import Worker

ENGINES = ("ferry", "transformers", "llama.cpp")
GGUF_TYPES = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}
HERE = Path(__file__).resolve().parent


def start(name: str, model_dir: str | Path, dtype: str, threads: int, prefix: list[str] | None = None,
          **options) -> Worker:
    """Start `name`'s worker on model_dir at dtype; raises Unavailable when the engine cannot run this model.
    prefix goes before the worker's command (e.g. bench/memlimit.py's, which runs it inside a memory cgroup)."""
    import sys
    if name == "ferry":
        cmd = [sys.executable, str(HERE / "ferry_engine.py")]
        model = str(model_dir)
    elif name == "transformers":
        cmd = [sys.executable, str(HERE / "hf_engine.py")]
        model = str(model_dir)
    elif name == "llama.cpp":
        from bench.peers.env import peer_python
        from bench.peers.gguf_export import ensure
        try:
            model = str(ensure(model_dir, GGUF_TYPES[dtype]))
        except NotImplementedError as e:
            raise Unavailable(f"no GGUF export: {e}") from e
        cmd = [peer_python(), str(HERE / "llamacpp_engine.py"), "--worker"]
    else:
        raise ValueError(f"unknown engine {name!r}; one of {ENGINES}")
    return Worker(name, [*(prefix or []), *cmd], {"model": model, "dtype": dtype, "threads": threads, **options})


class Unavailable(RuntimeError):
    """The engine cannot run this model or scenario; the message says why (it goes into the table)."""
