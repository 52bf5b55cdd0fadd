"""`ferry convert MODEL --quantization int4|int8 --out DIR`: quantize once, load many times.

The weights go through the loader's own `read_weights` (the same fusing, the same scheme, the same codes as
quantizing at load: a converted folder gives the same tokens), then into DIR as one safetensors file of ferry's
parameter names with the manifest beside it (ferry/quant/folder.py); the checkpoint's other files (config,
tokenizer, generation config, licence) are copied. The source's size and SHA-256 are recorded, so a folder says
what it was made from."""
from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ferry.config import ModelConfig
from ferry.errors import InvalidRequest
from ferry.models.checkpoint import PICKLE_SUFFIXES, Reader, checkpoint_files
from ferry.models.decoder import DecoderModel
from ferry.models.loader import read_weights
from ferry.quant.folder import MANIFEST, WEIGHTS, Manifest, read_manifest, tensor_entries, write_safetensors
from ferry.quant.model import describe
from ferry.quant.scheme import Scheme
from ferry.ops.quant import QuantizedWeight


@dataclass(frozen=True)
class Converted:
    manifest: Manifest
    summary: str  # e.g. "int4 x 20 (group 64: 12, per channel: 8)"
    source_nbytes: int


def convert_quantized(model: str | Path, out: str | Path, method: str, group_size: int | None = None,
                      lm_head: str | None = None) -> Converted:
    """MODEL -> DIR at `method` (int8 | int4); lm_head: the head's precision (int8 | int4 | none; None: int8)."""
    src, out = Path(model), Path(out)
    if read_manifest(src) is not None:
        raise InvalidRequest(f"{src} is already quantized; convert the original checkpoint")
    if out.exists() and any(out.iterdir()):
        raise InvalidRequest(f"{out} exists and is not empty; choose a new folder for --out")
    if out.resolve() == src.resolve():
        raise InvalidRequest("--out must be a new folder, not the model's own")
    scheme = Scheme.parse(method, group_size, lm_head)
    if group_size is not None and (group_size < 32 or group_size % 32):
        raise InvalidRequest(f"--quantization-group-size must be a multiple of 32, got {group_size}")
    cfg = ModelConfig.from_hf(str(src))
    files = checkpoint_files(src)
    expected = {name: tuple(p.shape) for name, p in DecoderModel(cfg, 1).named_parameters()}
    tensors, quantized, matrices = [], {}, {}
    for name, _, value in read_weights(cfg, Reader(files), expected, torch.float32, torch.device("cpu"), scheme):
        if isinstance(value, torch.Tensor):  # kept at the checkpoint's precision (read_weights gives float32)
            value = value.to(_stored_dtype(cfg))
        else:
            quantized[name] = value
            for prefix, q in _matrices(name, value):
                matrices[prefix] = {"bits": q.bits, "group": q.group}
        tensors += list(tensor_entries(name, value))
    out.mkdir(parents=True, exist_ok=True)
    _copy_side_files(src, out)
    nbytes = write_safetensors(out / WEIGHTS, tensors)
    source = {"path": str(src.resolve()), "nbytes": sum(f.stat().st_size for f in files), "sha256": _sha256(files)}
    manifest = Manifest(out, scheme.bits, group_size, matrices, nbytes, source, scheme.head_name)
    (out / MANIFEST).write_text(json.dumps(manifest.to_json(), indent=1))
    return Converted(manifest, describe(quantized), source["nbytes"])


def _stored_dtype(cfg: ModelConfig) -> torch.dtype:
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(cfg.checkpoint_dtype, torch.float32)


def _matrices(name: str, value: QuantizedWeight | list[QuantizedWeight]) -> list[tuple[str, QuantizedWeight]]:
    return [(f"{name}.{e}", q) for e, q in enumerate(value)] if isinstance(value, list) else [(name, value)]


def _copy_side_files(src: Path, out: Path) -> None:
    """Every file of the checkpoint but its weights (config, tokenizer, generation config, licence, ...)."""
    for f in src.iterdir():
        if f.is_file() and f.suffix not in (".safetensors", *PICKLE_SUFFIXES) \
                and f.name != "model.safetensors.index.json":
            shutil.copy2(f, out / f.name)


def _sha256(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()
