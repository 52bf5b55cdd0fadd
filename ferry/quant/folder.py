"""A quantized model folder: what `ferry convert MODEL --quantization int4|int8 --out DIR` writes and the loader
reads back without quantizing again.

    DIR/config.json, tokenizer files, ...   copied from MODEL (everything but its weights)
    DIR/model-quantized.safetensors         ferry's parameter names (q/k/v and gate/up already fused):
                                              <name>.codes, <name>.scales   a quantized matrix in the stored form
                                                                            of ferry.ops.quant (CPU-independent)
                                              <name>.<e>.codes / .scales    expert e of a stacked MoE parameter
                                              <name>                        a float tensor (embedding, norms, ...)
    DIR/quantization.json                   format and version, the scheme (bits, forced group size, the
                                            lm_head's precision), every matrix's bits and group, the weights
                                            file's size, the source's hash

Version 2 records `lm_head` (int8 | int4 | none) and may hold a tied model's `embed` quantized (it is the head).
A version-1 folder (written before the lm_head option) still loads: its untied head is int8 as stored, and a tied
model's float embedding is quantized at load to the head's precision (the int8 default unless asked otherwise;
about a second for a 150k vocabulary), so converting again only saves that second.

Everything read is checked against the manifest and config.json (present, dtype, shape, group), so a truncated,
edited or mismatched folder is a ModelLoadError naming the file and the fix, never wrong tokens."""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from ferry.config import QuantConfig
from ferry.errors import InvalidRequest, ModelLoadError
from ferry.models.checkpoint import DTYPES, Reader
from ferry.ops.quant import QuantizedWeight, check_group
from ferry.quant.scheme import BITS, DEFAULT_HEAD, HEAD_BITS, Scheme

FORMAT, VERSION = "ferry-weight-only", 2
READS = (1, 2)  # the versions this ferry loads (1: no lm_head entry, a tied embedding always in float)
MANIFEST = "quantization.json"
WEIGHTS = "model-quantized.safetensors"
CODE_DTYPES = {8: torch.int8, 4: torch.uint8}
REDO = "convert the original checkpoint again (`ferry convert MODEL --quantization ... --out DIR`)"


@dataclass(frozen=True)
class Manifest:
    folder: Path
    bits: int
    group_size: int | None  # forced at convert time, else None (chosen per matrix)
    matrices: dict[str, dict[str, int]]  # tensor prefix (<name> or <name>.<e>) -> {"bits", "group"}
    weights_nbytes: int
    source: dict
    lm_head: str | None = None  # int8 | int4 | none as converted; None: a version-1 folder (not recorded)

    def to_json(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "bits": self.bits, "group_size": self.group_size,
                "lm_head": self.lm_head, "weights": WEIGHTS, "weights_nbytes": self.weights_nbytes,
                "source": self.source, "matrices": self.matrices}

    def head_stored(self, head: str) -> str:
        """The precision the folder holds parameter `head` (the lm_head, or a tied model's embed) at."""
        entry = self.matrices.get(head)
        return "none" if entry is None else f"int{entry['bits']}"


def read_manifest(folder: str | Path) -> Manifest | None:
    """The folder's quantization.json, checked; None when the folder is a plain checkpoint."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        m = json.loads(path.read_text())
        if m.get("format") != FORMAT:
            raise ModelLoadError(f"{path} is not a ferry quantization manifest (format {m.get('format')!r}); {REDO}")
        if m.get("version") not in READS:
            raise ModelLoadError(f"{path} has format version {m.get('version')!r}; this ferry reads versions "
                                 f"{', '.join(map(str, READS))}: {REDO}")
        head = m["lm_head"] if m["version"] >= 2 else None
        if head is not None and head not in HEAD_BITS:
            raise ValueError(f"lm_head {head!r} is not one of {', '.join(HEAD_BITS)}")
        return Manifest(Path(folder), int(m["bits"]), m["group_size"], dict(m["matrices"]), int(m["weights_nbytes"]),
                        dict(m["source"]), head)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ModelLoadError(f"{path} is malformed ({type(e).__name__}: {e}); {REDO}") from None


def resolve_scheme(manifest: Manifest | None, quant: QuantConfig, head: str = "lm_head") -> Scheme | None:
    """The scheme to load with: the folder's when it is quantized (options must agree), else the options'. head:
    the parameter that is the lm_head (a tied model's embed). A folder whose head is in float takes any
    --quantization-lm-head (the float table is there to quantize at load); a quantized head only its own."""
    if manifest is None:
        return Scheme.parse(quant.method, quant.group_size, quant.lm_head) if quant.method else None
    have = f"int{manifest.bits}"
    if quant.method is not None and BITS[quant.method] != manifest.bits:
        raise InvalidRequest(f"{manifest.folder} is already quantized to {have} (by ferry convert); drop "
                             f"--quantization {quant.method}, or convert the original checkpoint with it")
    if quant.group_size is not None and quant.group_size != manifest.group_size:
        raise InvalidRequest(f"{manifest.folder} was converted with group size {manifest.group_size or 'chosen per matrix'}"
                             f", not {quant.group_size}; drop --quantization-group-size or convert again with it")
    stored = manifest.head_stored(head)
    if quant.lm_head is not None and stored != "none" and quant.lm_head != stored:
        raise InvalidRequest(f"{manifest.folder} holds its lm_head at {stored} (by ferry convert), not "
                             f"{quant.lm_head}; drop --quantization-lm-head, or convert the original checkpoint "
                             f"with it")
    if quant.lm_head is not None:
        wanted = quant.lm_head
    elif stored != "none":
        wanted = stored
    else:  # in float: as converted (version 2), or a version-1 folder, whose tied head was never quantized
        wanted = manifest.lm_head or DEFAULT_HEAD
    return Scheme(manifest.bits, manifest.group_size, head_bits=HEAD_BITS[wanted])


def tensor_entries(name: str, value: torch.Tensor | QuantizedWeight | list[QuantizedWeight]
                   ) -> Iterator[tuple[str, torch.Tensor]]:
    """The safetensors entries of one parameter (see the module docstring)."""
    if isinstance(value, torch.Tensor):
        yield name, value
        return
    for prefix, q in ([(f"{name}.{e}", q) for e, q in enumerate(value)] if isinstance(value, list) else [(name, value)]):
        yield f"{prefix}.codes", q.codes
        yield f"{prefix}.scales", q.scales


def write_safetensors(path: Path, tensors: list[tuple[str, torch.Tensor]]) -> int:
    """tensors -> one safetensors file (header, then each tensor's bytes in order); returns its size."""
    names = {v: k for k, v in DTYPES.items()}
    header, offset = {}, 0
    for name, t in tensors:
        n = t.numel() * t.element_size()
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for _, t in tensors:
            f.write(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return 8 + len(raw) + offset


def folder_weights(manifest: Manifest, expected: dict[str, tuple[int, ...]], dtype: torch.dtype,
                   device: torch.device, as_float32: frozenset[str] = frozenset()
                   ) -> Iterator[tuple[str, str, torch.Tensor | QuantizedWeight | list]]:
    """(parameter, where from, value) for every expected parameter (name -> shape), each checked. Float parameters
    named in as_float32 come in float32 on the CPU (the caller quantizes them: a version-1 folder's tied head)."""
    path = manifest.folder / WEIGHTS
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing (listed by {MANIFEST}); {REDO}")
    size = path.stat().st_size
    if size != manifest.weights_nbytes:
        raise ModelLoadError(f"{path} has {size} bytes, {MANIFEST} says {manifest.weights_nbytes}: the file is "
                             f"truncated or was modified; {REDO}")
    try:
        reader = Reader([path])
    except ModelLoadError as e:
        raise ModelLoadError(f"{e}; {REDO}") from None
    used: set[str] = set()
    for name, shape in expected.items():
        if name in manifest.matrices or f"{name}.0" in manifest.matrices:
            prefixes = [f"{name}.{e}" for e in range(shape[0])] if len(shape) == 3 else [name]
            qs = [_matrix(reader, manifest, p, tuple(shape[-2:]), used) for p in prefixes]
            yield name, str(path), qs if len(shape) == 3 else qs[0]
        elif name in as_float32:
            yield name, str(path), _float(reader, path, name, torch.float32, torch.device("cpu"), used)
        else:
            yield name, str(path), _float(reader, path, name, dtype, device, used)
    extra = sorted(set(reader.where) - used)
    if extra or set(manifest.matrices) - {k.rsplit(".", 1)[0] for k in used if k.endswith(".codes")}:
        raise ModelLoadError(f"{path} / {MANIFEST} list tensors this model (config.json) does not have, e.g. "
                             f"{(extra or sorted(manifest.matrices))[:3]}: the folder does not match its config.json; "
                             f"{REDO}")


def _float(reader: Reader, path: Path, name: str, dtype: torch.dtype, device: torch.device, used: set) -> torch.Tensor:
    if not reader.has(name):
        if reader.has(f"{name}.codes") or reader.has(f"{name}.0.codes"):
            raise ModelLoadError(f"{path} holds {name} quantized, but {path.parent / MANIFEST} has no entry for "
                                 f"{name}: the two do not match; {REDO}")
        raise ModelLoadError(f"{path} has no tensor {name!r} (config.json's model needs it); {REDO}")
    used.add(name)
    t = _get(reader, path, name)
    return t if t.dtype == dtype and t.device == device else t.to(device=device, dtype=dtype)


def _matrix(reader: Reader, manifest: Manifest, prefix: str, shape: tuple[int, int], used: set) -> QuantizedWeight:
    """One stored matrix, its dtypes and shapes checked against the manifest and the model's shape [N, K]."""
    path = manifest.folder / WEIGHTS
    entry = manifest.matrices.get(prefix)
    if entry is None:
        raise ModelLoadError(f"{manifest.folder / MANIFEST} has no entry for {prefix}; {REDO}")
    bits, group = int(entry["bits"]), int(entry["group"])
    N, K = shape
    reason = check_group(bits, K, group)
    if reason:
        raise ModelLoadError(f"{manifest.folder / MANIFEST}: {prefix} at int{bits}, group {group}: {reason}; {REDO}")
    want = {"codes": (CODE_DTYPES[bits], (N, K // 2 if bits == 4 else K)), "scales": (torch.float16, (N, K // group))}
    got = {}
    for part, (dt, shp) in want.items():
        key = f"{prefix}.{part}"
        if not reader.has(key):
            raise ModelLoadError(f"{path} has no tensor {key!r} (listed in {MANIFEST}); {REDO}")
        file_dt, file_shape = reader.where[key][1], tuple(reader.where[key][2])
        if file_dt != dt or file_shape != shp:
            raise ModelLoadError(f"{path}: {key} is {file_dt} {file_shape}, but {MANIFEST} (int{bits}, group {group}) "
                                 f"and config.json imply {dt} {shp}; {REDO}")
        used.add(key)
        got[part] = _get(reader, path, key)
    return QuantizedWeight(bits, group, got["codes"], got["scales"])


def _get(reader: Reader, path: Path, name: str) -> torch.Tensor:
    try:
        return reader.get(name)
    except ModelLoadError as e:
        raise ModelLoadError(f"{e}; {REDO}") from None
