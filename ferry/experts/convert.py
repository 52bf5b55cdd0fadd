"""`ferry convert MODEL --expert-store DIR`: lay a MoE checkpoint's experts out for fast contiguous reads.

One layer at a time: the layer's experts are read from the safetensors (whatever the checkpoint's naming:
per-expert tensors or transformers' stacked layout), fused like the resident path does (gate and up into
gate_up), cast to the store dtype, and written as ALIGNed records (see layout.py). The rest of the
model is not copied: at run time it is loaded from MODEL as usual, and experts come from DIR."""
from __future__ import annotations

import os
import zlib
from pathlib import Path

import torch

from ferry.config import ModelConfig
from ferry.errors import InvalidRequest, ModelLoadError
from ferry.experts.layout import DTYPES, INDEX_NAME, ExpertLayout, ExpertRecord, StoreIndex
from ferry.models.loader import _build, _hf_names, _Reader, checkpoint_files


def store_dtype(name: str, cfg: ModelConfig) -> str:
    if name == "auto":
        name = cfg.checkpoint_dtype
        name = "bfloat16" if name == "float16" else name  # what the engine runs float16 checkpoints as on CPU
    if name not in DTYPES or name == "float16":
        raise InvalidRequest(f"expert store dtype must be float32 or bfloat16 (or auto), got {name!r}")
    return name


def expert_bytes(gate_up: torch.Tensor, down: torch.Tensor, layout: ExpertLayout) -> bytes:
    """One expert's record: gate_up, pad, down, pad to record_nbytes."""
    rec = bytearray(layout.record_nbytes)
    g = gate_up.contiguous().view(torch.uint8).flatten().numpy().tobytes()
    d = down.contiguous().view(torch.uint8).flatten().numpy().tobytes()
    rec[:len(g)] = g
    rec[layout.down_offset:layout.down_offset + len(d)] = d
    return bytes(rec)


def payload_crc(record: bytes | memoryview, layout: ExpertLayout) -> int:
    return zlib.crc32(record[:layout.payload_nbytes])


def convert_expert_store(model: str | os.PathLike, out_dir: str | os.PathLike, dtype: str = "auto") -> StoreIndex:
    cfg = ModelConfig.from_hf(str(model))
    if cfg.moe is None:
        raise InvalidRequest(f"{model} ({cfg.architecture}) has no experts; --expert-store is for MoE models")
    name = store_dtype(dtype, cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    reader = _Reader(checkpoint_files(Path(cfg.path)))
    names = _hf_names(cfg, reader)
    layout = ExpertLayout.for_shape(name, cfg.hidden_size, cfg.moe.intermediate_size)
    want = {"gate_up": (cfg.moe.num_experts, *layout.gate_up_shape), "down": (cfg.moe.num_experts, *layout.down_shape)}
    files, records = {}, {}
    for layer in range(cfg.num_layers):
        if not cfg.moe.sparse_layers[layer]:
            continue
        stacked = {}
        for part in ("gate_up", "down"):
            t = _build(reader, names[f"layers.{layer}.mlp.experts.{part}"], DTYPES[name], torch.device("cpu"))
            if tuple(t.shape) != want[part]:
                raise ModelLoadError(f"layer {layer} experts' {part} has shape {tuple(t.shape)}, config.json implies "
                                     f"{want[part]}")
            stacked[part] = t
        files[layer] = f"layer{layer:03d}.experts"
        records[layer] = []
        path = out / files[layer]
        with open(path, "wb") as f:
            for e in range(cfg.moe.num_experts):
                rec = expert_bytes(stacked["gate_up"][e], stacked["down"][e], layout)
                records[layer].append(ExpertRecord(offset=f.tell(), crc32=payload_crc(rec, layout)))
                f.write(rec)
            f.flush()
            os.fsync(f.fileno())
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # the first run reads from disk too
    index = StoreIndex(layout, cfg.architecture, cfg.num_layers, cfg.moe.num_experts, files, records)
    tmp = out / (INDEX_NAME + ".tmp")
    tmp.write_text(index.to_json())
    tmp.replace(out / INDEX_NAME)  # the index appears only once every layer file is complete
    return index
