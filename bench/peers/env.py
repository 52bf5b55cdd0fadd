"""The peers' own environment, owned by the suite and cached under bench/.cache/ (git-ignored).

- bench/.cache/peers/: a venv with `llama-cpp-python[server]` and `gguf` from PyPI (pinned below). The wheel is compiled
  from source by pip (GGML_NATIVE=ON, so it uses this CPU's AVX-512/BF16); it takes ~15-25 min on 2 cores.
- bench/.cache/peers/bin/llama-server: llama.cpp's own HTTP server, built from the llama.cpp sources vendored
  in that same llama-cpp-python release (the wheel ships only libllama, not the tools). It is the server
  with parallel slots and continuous batching; llama-cpp-python's Python server handles one request at a
  time. Built with cmake, static, only the `llama-server` target.

    .venv/bin/python -m bench.peers.env          # set up both (idempotent), print versions
"""
from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

CACHE = Path(__file__).resolve().parents[1] / ".cache"
VENV = CACHE / "peers"
SERVER_BIN = VENV / "bin" / "llama-server"
SRC = CACHE / "llama.cpp-src"             # llama.cpp sources vendored in llama-cpp-python's sdist
# pinned: bench/engines/llamacpp_engine.py drives libllama's low-level API (load modes, flash_attn_type, kv_unified),
# which changes between releases; move the pins together with a `python -m bench decode --smoke` run
PIP_SPEC = ["llama-cpp-python[server]==0.3.36", "gguf==0.19.0"]


@functools.cache
def peer_python() -> str:
    """The peers venv's python, creating the venv and installing the peers first if needed."""
    py = VENV / "bin" / "python"
    if py.is_file() and subprocess.run([str(py), "-c", "import llama_cpp, gguf"], capture_output=True).returncode == 0:
        return str(py)
    print(f"setting up {VENV} (pip install {' '.join(PIP_SPEC)}; compiles llama.cpp, 15-25 min) ...", flush=True)
    if not py.is_file():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    env = {**os.environ, "CMAKE_ARGS": os.environ.get("CMAKE_ARGS", "-DGGML_NATIVE=ON")}  # this CPU's ISA
    subprocess.run([str(py), "-m", "pip", "install", "-q", *PIP_SPEC], check=True, env=env)
    return str(py)


def versions() -> dict:
    """Versions of the peer packages and the llama.cpp build, for the JSON records."""
    code = ("import json, llama_cpp, gguf, importlib.metadata as m; print(json.dumps({"
            "'llama_cpp_python': llama_cpp.__version__, 'gguf': m.version('gguf'), "
            "'llama_cpp_system_info': llama_cpp.llama_print_system_info().decode()}))")
    out = subprocess.run([peer_python(), "-c", code], capture_output=True, text=True, check=True).stdout
    import json
    info = json.loads(out.strip().splitlines()[-1])
    if SERVER_BIN.is_file():
        r = subprocess.run([str(SERVER_BIN), "--version"], capture_output=True, text=True)
        info["llama_server"] = "; ".join((r.stdout + r.stderr).strip().splitlines()) + \
            f" (sources vendored in llama-cpp-python {info['llama_cpp_python']})"
    return info


def _fetch_source() -> Path:
    """The llama.cpp tree vendored in the installed llama-cpp-python's sdist (same version as the wheel)."""
    if (SRC / "tools" / "server").is_dir():
        return SRC
    py = peer_python()
    version = subprocess.run([py, "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                             capture_output=True, text=True, check=True).stdout.strip()
    dl = CACHE / "sdist"
    subprocess.run([py, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", "-d", str(dl),
                    f"llama-cpp-python=={version}"], check=True)
    tgz = next(dl.glob(f"llama_cpp_python-{version}.tar.gz"))
    with tarfile.open(tgz) as tf:
        tf.extractall(dl, filter="data")
    shutil.move(str(dl / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"), str(SRC))
    shutil.rmtree(dl)
    return SRC


def llama_server(jobs: int = 1) -> Path:
    """Path of the llama-server binary, building it (nice'd, `jobs` compile jobs) if missing."""
    if SERVER_BIN.is_file():
        return SERVER_BIN
    src = _fetch_source()
    build = CACHE / "llama.cpp-build"
    print(f"building llama-server from {src} into {build} (-j{jobs}) ...", flush=True)
    flags = ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_CURL=OFF",
             "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TOOLS=ON",
             "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_TESTS=OFF",
             "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF"]  # no web UI: nothing downloaded
    nice = ["nice", "-n", "19"]
    subprocess.run([*nice, "cmake", "-S", str(src), "-B", str(build), *flags], check=True,
                   stdout=subprocess.DEVNULL)
    subprocess.run([*nice, "cmake", "--build", str(build), "--target", "llama-server", "-j", str(jobs)], check=True)
    shutil.copy2(build / "bin" / "llama-server", SERVER_BIN)
    return SERVER_BIN


def main() -> None:
    import argparse
    import json
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=1, help="parallel compile jobs for llama-server")
    args = ap.parse_args()
    llama_server(jobs=args.jobs)
    print(json.dumps(versions(), indent=2))


if __name__ == "__main__":
    main()
