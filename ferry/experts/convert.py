"""`ferry convert MODEL --expert-store DIR`: lay a MoE checkpoint's experts out for fast contiguous reads.

One layer at a time: the layer's experts are read from the safetensors (whatever the checkpoint's naming:
per-expert tensors or transformers' stacked layout), fused like the resident path does (gate and up into
gate_up), cast to the store dtype, and written as ALIGNed records (see layout.py). The rest of the
model is not copied: at run time it is loaded from MODEL as usual, and experts come from DIR."""
from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import Iterator

import torch

from ferry.config import ModelConfig
from ferry.errors import InvalidRequest
from ferry.experts.layout import DTYPES, INDEX_NAME, ExpertLayout, ExpertRecord, StoreIndex
from ferry.experts.quant import QuantLayout, group_size_for, quantizable
from ferry.models.checkpoint import Reader, checkpoint_files
from ferry.models.loader import read_experts

BITS = ("none", "8", "4", "auto")  # --expert-bits: dense, all int8, all int4, int4 for the least sensitive


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


def int4_error(gate_up: torch.Tensor, down: torch.Tensor, group: int, num_tokens: int = 64) -> float:
    """Measured sensitivity of one expert to int4: relative error of its output on Gaussian inputs."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(num_tokens, gate_up.shape[1], generator=g)
    q = QuantLayout(4, group, gate_up.shape[1], down.shape[1])
    slot = torch.frombuffer(bytearray(q.encode(gate_up, down)), dtype=torch.uint8)
    gq, dq = q.unpack(slot, torch.empty(gate_up.shape), torch.empty(down.shape))
    want = _swiglu(x, gate_up.float(), down.float())
    return float((_swiglu(x, gq, dq) - want).norm() / want.norm().clamp(min=1e-12))


def _swiglu(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    gate, up = (x @ gate_up.T).chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up) @ down.T


def choose_bits(int4_errors: dict[tuple[int, int], float], int4_fraction: float) -> dict[tuple[int, int], int]:
    """(layer, expert) -> 4 for the int4_fraction of experts least hurt by int4 (measured), 8 for the others."""
    num_int4 = round(len(int4_errors) * int4_fraction)
    return {k: 4 if i < num_int4 else 8 for i, k in enumerate(sorted(int4_errors, key=int4_errors.get))}


def convert_expert_store(model: str | os.PathLike, out_dir: str | os.PathLike, dtype: str = "auto",
                         bits: str = "none", int4_fraction: float = 0.5) -> StoreIndex:
    """bits: none (experts as they are, in dtype), 8 / 4 (every expert int8 / int4), auto (int4 for the
    int4_fraction least sensitive experts, int8 for the rest). Quantized stores are lossy."""
    if bits not in BITS:
        raise InvalidRequest(f"expert bits must be one of {', '.join(BITS)}, got {bits!r}")
    if not 0 <= int4_fraction <= 1:
        raise InvalidRequest(f"int4 fraction must be in [0, 1], got {int4_fraction}")
    cfg = ModelConfig.from_hf(str(model))
    if cfg.moe is None:
        raise InvalidRequest(f"{model} ({cfg.architecture}) has no experts; --expert-store is for MoE models")
    name = store_dtype(dtype, cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    reader = Reader(checkpoint_files(Path(cfg.path)))
    group = group_size_for(cfg.hidden_size, cfg.moe.intermediate_size) if bits in ("4", "auto") else 0
    why = quantizable(4, cfg.hidden_size, cfg.moe.intermediate_size) if bits in ("4", "auto") else None
    if why:
        raise InvalidRequest(f"cannot store {model}'s experts at --expert-bits {bits}: {why}")
    layout = ExpertLayout.for_shape(name, cfg.hidden_size, cfg.moe.intermediate_size, group)
    moe_layers = [l for l in range(cfg.num_layers) if cfg.moe.sparse_layers[l]]

    def layers() -> Iterator[tuple[int, dict[str, torch.Tensor]]]:  # one layer's experts in memory at a time
        return ((l, read_experts(cfg, reader, l, layout.torch_dtype)) for l in moe_layers)

    if bits == "auto":
        chosen = choose_bits({(l, e): int4_error(t["gate_up"][e], t["down"][e], group)
                              for l, t in layers() for e in range(cfg.moe.num_experts)}, int4_fraction)
    else:
        chosen = {(l, e): {"none": 0, "8": 8, "4": 4}[bits] for l in moe_layers for e in range(cfg.moe.num_experts)}
    files, records = {}, {}
    for layer, t in layers():
        files[layer] = f"layer{layer:03d}.experts"
        records[layer] = []
        with open(out / files[layer], "wb") as f:
            for e in range(cfg.moe.num_experts):
                fmt = layout.record_format(chosen[(layer, e)])
                rec = expert_bytes(t["gate_up"][e], t["down"][e], layout) if fmt is layout else \
                    fmt.encode(t["gate_up"][e], t["down"][e])
                records[layer].append(ExpertRecord(f.tell(), payload_crc(rec, fmt), chosen[(layer, e)]))
                f.write(rec)
            f.flush()
            os.fsync(f.fileno())
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # the first run reads from disk too
    index = StoreIndex(layout, cfg.architecture, cfg.num_layers, cfg.moe.num_experts, files, records)
    tmp = out / (INDEX_NAME + ".tmp")
    tmp.write_text(index.to_json())
    tmp.replace(out / INDEX_NAME)  # the index appears only once every layer file is complete
    return index

