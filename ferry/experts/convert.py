"""`ferry convert MODEL --expert-store DIR`: lay a MoE checkpoint's experts out for fast contiguous reads.

One layer at a time: the layer's experts are read from the safetensors (whatever the checkpoint's naming:
per-expert tensors or transformers' stacked layout), fused like the resident path does (gate and up into
gate_up), cast to the store dtype, and written as ALIGNed records (see layout.py). The rest of the
model is not copied: at run time it is loaded from MODEL as usual, and experts come from DIR.

`--expert-bits auto --expert-store-size SIZE` first measures every expert at every candidate format on inputs
recorded from held-out text (`plan_expert_bits`: bitwidth.py measures, allocate.py chooses), then writes each
expert in its chosen format; every record carries its bits and int4 group in index.json."""
from __future__ import annotations

import json
import os
import zlib
from pathlib import Path
from typing import Callable, Iterator

import torch

from ferry.config import ModelConfig
from ferry.errors import InvalidRequest
from ferry.experts.allocate import BitPlan, allocate, check_size
from ferry.experts.bitwidth import Calibration, ExpertCost, Format, candidate_formats, format_nbytes, measure_layer
from ferry.experts.layout import DTYPES, INDEX_NAME, ExpertLayout, ExpertRecord, StoreIndex
from ferry.experts.quant import QuantLayout, group_size_for, quantizable
from ferry.models.checkpoint import Reader, checkpoint_files
from ferry.models.loader import read_experts

BITS = ("none", "8", "4", "auto")  # --expert-bits: dense, all int8, all int4, chosen per expert to fit a size
BITS_TABLE = "expert_bits.json"  # beside an auto store's index: every expert's measured options and its choice


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


def payload_crc(record: bytes | memoryview, layout: ExpertLayout | QuantLayout) -> int:
    return zlib.crc32(record[:layout.payload_nbytes])


def _setup(model: str | os.PathLike, dtype: str, bits: str) -> tuple[ModelConfig, ExpertLayout, list[int]]:
    """The model's config, the store's layout and its MoE layers; clear errors for what cannot be stored."""
    if bits not in BITS:
        raise InvalidRequest(f"expert bits must be one of {', '.join(BITS)}, got {bits!r}")
    cfg = ModelConfig.from_hf(str(model))
    if cfg.moe is None:
        raise InvalidRequest(f"{model} ({cfg.architecture}) has no experts; --expert-store is for MoE models")
    why = quantizable(4, cfg.hidden_size, cfg.moe.intermediate_size) if bits in ("4", "auto") else None
    if why:
        raise InvalidRequest(f"cannot store {model}'s experts at --expert-bits {bits}: {why}")
    group = group_size_for(cfg.hidden_size, cfg.moe.intermediate_size) if bits in ("4", "auto") else 0
    layout = ExpertLayout.for_shape(store_dtype(dtype, cfg), cfg.hidden_size, cfg.moe.intermediate_size, group)
    return cfg, layout, [l for l in range(cfg.num_layers) if cfg.moe.sparse_layers[l]]


def _layers(cfg: ModelConfig, layout: ExpertLayout, moe_layers: list[int]) -> Iterator[tuple[int, dict]]:
    """(layer, its experts as the store holds them dense): one layer's experts in memory at a time."""
    reader = Reader(checkpoint_files(Path(cfg.path)))
    return ((l, read_experts(cfg, reader, l, layout.torch_dtype)) for l in moe_layers)


def check_store_size(model: str | os.PathLike, size: int, dtype: str = "auto") -> None:
    """The size errors of `--expert-bits auto --expert-store-size`, before anything is recorded or measured."""
    cfg, layout, moe_layers = _setup(model, dtype, "auto")
    formats = candidate_formats(layout)
    n = len(moe_layers) * cfg.moe.num_experts
    check_size([ExpertCost((0, e), 0.0, 0, [(f, format_nbytes(layout, f), 0.0) for f in formats])
                for e in range(n)], size)


def plan_expert_bits(model: str | os.PathLike, calibration: Calibration, size: int, dtype: str = "auto",
                     progress: Callable[[str], None] | None = None) -> BitPlan:
    """Measure every expert at every candidate format on calibration's inputs and choose formats that fit size
    bytes of records (ferry/experts/bitwidth.py, allocate.py)."""
    check_store_size(model, size, dtype)
    cfg, layout, moe_layers = _setup(model, dtype, "auto")
    formats = candidate_formats(layout)
    costs = []
    for i, (layer, t) in enumerate(_layers(cfg, layout, moe_layers)):
        if progress:
            progress(f"measuring expert errors: MoE layer {i + 1}/{len(moe_layers)} ({len(formats)} formats)")
        costs += measure_layer(layer, t, calibration, layout, formats)
    return BitPlan(costs, allocate(costs, size), size, calibration.source)


def convert_expert_store(model: str | os.PathLike, out_dir: str | os.PathLike, dtype: str = "auto",
                         bits: str = "none", plan: BitPlan | None = None) -> StoreIndex:
    """bits: none (experts as they are, in dtype), 8 / 4 (every expert int8 / int4), auto (each expert in the
    format `plan` chose for it: plan_expert_bits; its table is written beside the index as expert_bits.json).
    Quantized stores are lossy."""
    if (bits == "auto") != (plan is not None):
        raise InvalidRequest("--expert-bits auto needs a plan of the experts' formats (plan_expert_bits), and "
                             "only auto takes one")
    cfg, layout, moe_layers = _setup(model, dtype, bits)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    uniform = {"none": Format(0), "8": Format(8), "4": Format(4)}.get(bits)
    files, records = {}, {}
    for layer, t in _layers(cfg, layout, moe_layers):
        files[layer] = f"layer{layer:03d}.experts"
        records[layer] = []
        with open(out / files[layer], "wb") as f:
            for e in range(cfg.moe.num_experts):
                fmt = uniform or plan.choice[(layer, e)]
                rec_fmt = layout.record_format(fmt.bits, fmt.group)
                rec = expert_bytes(t["gate_up"][e], t["down"][e], layout) if rec_fmt is layout else \
                    rec_fmt.encode(t["gate_up"][e], t["down"][e])
                records[layer].append(ExpertRecord(f.tell(), payload_crc(rec, rec_fmt), fmt.bits, fmt.group))
                f.write(rec)
            f.flush()
            os.fsync(f.fileno())
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # the first run reads from disk too
    if plan is not None:
        (out / BITS_TABLE).write_text(json.dumps(plan.to_json(), indent=1))
    index = StoreIndex(layout, cfg.architecture, cfg.num_layers, cfg.moe.num_experts, files, records)
    tmp = out / (INDEX_NAME + ".tmp")
    tmp.write_text(index.to_json())
    tmp.replace(out / INDEX_NAME)  # the index appears only once every layer file is complete
    return index
