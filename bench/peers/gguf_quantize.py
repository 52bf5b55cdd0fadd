"""A float32 GGUF -> Q8_0 / Q4_0 with llama.cpp's own quantizer (libllama's `llama_model_quantize`, what the
`llama-quantize` tool calls), through llama-cpp-python in the peers venv. Default parameters, as a llama.cpp user
gets them: the file type's rules decide per tensor (for Q4_0 llama.cpp keeps the output / tied embedding at
Q6_K, and 1-D tensors at F32).

    .venv/bin/python bench/peers/gguf_quantize.py bench/.cache/qwen2.5-0.5b --type q4_0    # -> bench/.cache/gguf/

In code, `ensure(model_dir, qtype)` returns the cached quantized GGUF (from `gguf_export.ensure(model_dir, "f32")`),
quantizing when it is missing or older than its source."""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]          # bench/
QTYPES = ("q8_0", "q4_0")


def ensure(model_dir: str | Path, qtype: str, threads: int = 2) -> Path:
    """The cached `qtype` GGUF of model_dir (quantized from its float32 GGUF in the peers venv if needed)."""
    from bench.peers.env import peer_python
    from bench.peers.gguf_export import ensure as ensure_float, gguf_path
    src = ensure_float(model_dir, "f32")
    out = gguf_path(Path(model_dir), qtype)
    if out.is_file() and out.stat().st_mtime >= max(src.stat().st_mtime, Path(__file__).stat().st_mtime):
        return out
    subprocess.run([peer_python(), str(Path(__file__)), str(src), "--type", qtype, "--out", str(out),
                    "--threads", str(threads)], check=True, stdout=subprocess.DEVNULL)
    return out


def quantize(src: Path, out: Path, qtype: str, threads: int) -> Path:
    """Runs in the peers venv: llama_model_quantize(src -> out) at the file type of qtype."""
    import llama_cpp as L
    params = L.llama_model_quantize_default_params()
    params.ftype = {"q8_0": L.LLAMA_FTYPE_MOSTLY_Q8_0, "q4_0": L.LLAMA_FTYPE_MOSTLY_Q4_0}[qtype]
    params.nthread = threads
    tmp = out.with_suffix(".tmp")
    if L.llama_model_quantize(str(src).encode(), str(tmp).encode(), params) != 0:
        raise RuntimeError(f"llama_model_quantize {src} -> {qtype} failed")
    tmp.replace(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", type=Path, help="a float32 GGUF (or, from the main venv, a Hugging Face folder)")
    ap.add_argument("--type", choices=QTYPES, default="q4_0")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    try:
        import llama_cpp  # noqa: F401
    except ImportError:  # the main venv: a Hugging Face folder, exported and quantized in the peers venv
        sys.path.insert(0, str(ROOT.parent))
        print(ensure(args.source, args.type, args.threads))
        return
    print(quantize(args.source, args.out or args.source.with_name(f"{args.source.stem}-{args.type}.gguf"),
                   args.type, args.threads))


if __name__ == "__main__":
    main()
