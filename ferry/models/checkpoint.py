"""The checkpoint's files: which ones hold the weights, and reading tensors out of them.

Only safetensors are read (pickle checkpoints are refused: unpickling runs arbitrary code). Tensors are read
with plain file reads into memory the caller owns, not through an mmap: mmapped pages count in the process's
resident memory until unmapped, so mmap-then-copy costs twice the weights at its peak; and a tensor left
mmapped is dropped from the page cache when idle and re-read from disk on the next request. The format is
an 8-byte header length, a JSON header (name -> dtype, shape, byte offsets), then the raw bytes."""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

from ferry.errors import ModelLoadError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
MAX_HEADER = 100 << 20  # the format's own limit


def checkpoint_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (KeyError, json.JSONDecodeError) as e:
            raise ModelLoadError(f"{index} is malformed ({e}); it must map tensor names to shard files") from None
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise ModelLoadError(f"{folder} is missing shard files listed in model.safetensors.index.json: {missing}")
        return [folder / n for n in names]
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    pickles = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise ModelLoadError(
            f"{folder} holds only pickle checkpoints ({', '.join(pickles)}); ferry loads safetensors only, because "
            "unpickling can run arbitrary code. Convert it, e.g. with transformers: "
            "AutoModelForCausalLM.from_pretrained(src).save_pretrained(dst, safe_serialization=True)")
    raise ModelLoadError(f"{folder} has no *.safetensors weights")


class Reader:
    """Name -> tensor across shard files, each read on demand into a fresh tensor."""

    def __init__(self, files: list[Path]) -> None:
        self.where: dict[str, tuple[Path, torch.dtype, list[int], int, int]] = {}  # file, dtype, shape, begin, end
        for f in files:
            for name, (dtype, shape, begin, end) in _header(f).items():
                self.where[name] = (f, dtype, shape, begin, end)

    def has(self, name: str) -> bool:
        return name in self.where

    def shape(self, name: str) -> list[int]:
        self._check(name)
        return self.where[name][2]

    def _check(self, name: str) -> None:
        if name not in self.where:
            raise ModelLoadError(f"tensor {name!r} is missing from the checkpoint")

    def get(self, name: str) -> torch.Tensor:
        self._check(name)
        f, dtype, shape, begin, end = self.where[name]
        t = torch.empty(shape, dtype=dtype)
        buf = memoryview(t.view(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")
        if len(buf) != end - begin:
            raise ModelLoadError(f"tensor {name!r} in {f}: {end - begin} bytes for shape {shape} {dtype}; "
                                 "the file is not valid safetensors")
        try:
            with open(f, "rb", buffering=0) as fh:
                fh.seek(begin)
                got = fh.readinto(buf) if len(buf) else 0
                os.posix_fadvise(fh.fileno(), begin, end - begin, os.POSIX_FADV_DONTNEED)  # the copy is ours now
        except OSError as e:
            raise ModelLoadError(f"cannot read tensor {name!r} from {f}: {e}") from None
        if got != len(buf):
            raise ModelLoadError(f"cannot read tensor {name!r} from {f}: the file ends early (truncated?)")
        return t


def _header(f: Path) -> dict[str, tuple[torch.dtype, list[int], int, int]]:
    """name -> (dtype, shape, absolute begin, absolute end) of each tensor in safetensors file f."""
    bad = f"cannot read {f}: the file is not valid safetensors (truncated?)"
    try:
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > MAX_HEADER:
                raise ModelLoadError(bad)
            meta = json.loads(fh.read(n))
        size = f.stat().st_size
        out = {}
        for name, e in meta.items():
            if name == "__metadata__":
                continue
            begin, end = (8 + n + o for o in e["data_offsets"])
            if e["dtype"] not in DTYPES or not begin <= end <= size:
                raise ModelLoadError(f"{bad} (tensor {name!r})")
            out[name] = (DTYPES[e["dtype"]], list(e["shape"]), begin, end)
        return out
    except (struct.error, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError):
        raise ModelLoadError(bad) from None
