"""The on-disk expert store: one file per MoE layer, each expert's weights contiguous at an ALIGNed offset,
described by `index.json`.

A dense expert record is  gate_up [2I, D] | pad to 64 B | down [D, I] | pad to ALIGN  in the store's dtype,
so one aligned read fills one cache slot and the two tensors are views into it; quantized records
(int8/int4, quant.py) hold the CPU-independent stored form, read in place by the quantized kernels. index.json
holds the layout, each expert's offset and CRC32 (of its unpadded bytes), and enough of the model's shape to
refuse a store built for another model."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ferry.errors import ModelLoadError
from ferry.experts.quant import QuantLayout
from ferry.tiers.disk import ALIGN, align_up

INDEX_NAME = "index.json"
FORMAT = "ferry-expert-store"
VERSION = 3  # 3: quantized records in the CPU-independent stored form (versions 1-2 are read if dense)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ExpertRecord:
    offset: int  # byte offset of the expert in its layer file (ALIGNed)
    crc32: int  # of the gate_up and down bytes (not the padding)
    bits: int = 0  # 0: dense in the store's dtype; 8 or 4: quantized (quant.py)
    group: int | None = None  # int4 inputs per scale of this record (0: per channel); None: the layout's group_size


@dataclass(frozen=True)
class ExpertLayout:
    """Byte layout shared by every expert of the store."""

    dtype: str
    hidden_size: int  # D
    intermediate_size: int  # I
    down_offset: int  # where down starts inside a dense expert record
    group_size: int = 0  # inputs per scale of int4 experts (0: the store has none)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def gate_up_shape(self) -> tuple[int, int]:
        return 2 * self.intermediate_size, self.hidden_size

    @property
    def down_shape(self) -> tuple[int, int]:
        return self.hidden_size, self.intermediate_size

    @property
    def payload_nbytes(self) -> int:
        """Bytes of real data in a record (the checksummed part)."""
        return self.down_offset + self.hidden_size * self.intermediate_size * self.torch_dtype.itemsize

    @property
    def record_nbytes(self) -> int:
        """Bytes of one record on disk and of one cache slot in RAM."""
        return align_up(self.payload_nbytes, ALIGN)

    @classmethod
    def for_shape(cls, dtype: str, hidden: int, inter: int, group_size: int = 0) -> "ExpertLayout":
        item = DTYPES[dtype].itemsize
        return cls(dtype, hidden, inter, align_up(2 * inter * hidden * item, 64), group_size)

    def record_format(self, bits: int, group: int | None = None) -> "ExpertLayout | QuantLayout":
        """The byte layout of a record stored at `bits` (0: this dense layout) with int4 `group` (None: the
        store's group_size; a store from `--expert-bits auto` chooses it per expert)."""
        if bits == 0:
            return self
        return QuantLayout(bits, self.group_size if group is None else group, self.hidden_size,
                           self.intermediate_size)

    def format_of(self, record: "ExpertRecord") -> "ExpertLayout | QuantLayout":
        """The byte layout of one stored record."""
        return self.record_format(record.bits, record.group)

    def views(self, slot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up, down) views into a uint8 slot of record_nbytes."""
        dt = self.torch_dtype
        g = slot[:2 * self.intermediate_size * self.hidden_size * dt.itemsize].view(dt).view(self.gate_up_shape)
        d = slot[self.down_offset:self.payload_nbytes].view(dt).view(self.down_shape)
        return g, d


@dataclass(frozen=True)
class StoreIndex:
    layout: ExpertLayout
    architecture: str
    num_layers: int
    num_experts: int
    layer_files: dict[int, str]  # MoE layer -> file name inside the store folder
    experts: dict[int, list[ExpertRecord]]  # MoE layer -> record of each expert

    @property
    def slot_nbytes(self) -> int:
        """RAM for any one expert of the store: its largest record."""
        return max(self.layout.format_of(r).record_nbytes for recs in self.experts.values() for r in recs)

    @property
    def total_nbytes(self) -> int:
        """Every expert's record."""
        return sum(self.layout.format_of(r).record_nbytes for recs in self.experts.values() for r in recs)

    def to_json(self) -> str:
        d = {"format": FORMAT, "version": VERSION, "architecture": self.architecture,
             "num_layers": self.num_layers, "num_experts": self.num_experts, "alignment": ALIGN,
             "layout": asdict(self.layout), "slot_nbytes": self.slot_nbytes,
             "layers": {str(l): {"file": self.layer_files[l], "experts": [asdict(r) for r in self.experts[l]]}
                        for l in sorted(self.experts)}}
        return json.dumps(d, indent=1)

    @classmethod
    def load(cls, folder: str | Path) -> "StoreIndex":
        path = Path(folder) / INDEX_NAME
        if not path.is_file():
            raise ModelLoadError(f"{folder} is not an expert store: {INDEX_NAME} is missing "
                                 "(build one with `ferry convert MODEL --expert-store DIR`)")
        try:
            d = json.loads(path.read_text())
            if d.get("format") != FORMAT or d.get("version") not in (1, 2, VERSION):
                raise ModelLoadError(f"{path} is not a version-{VERSION} {FORMAT} index")
            if d["version"] < VERSION and any(r.get("bits") for v in d["layers"].values() for r in v["experts"]):
                raise ModelLoadError(f"{path} holds int8/int4 experts in the version-{d['version']} layout (a "
                                     "CPU-specific packing), which this ferry no longer reads; re-run `ferry convert "
                                     "MODEL --expert-store DIR --expert-bits ...` to rebuild the store")
            if d["alignment"] != ALIGN:
                raise ModelLoadError(f"{path} was written with alignment {d['alignment']}, this ferry reads {ALIGN}")
            layout = ExpertLayout(**d["layout"])
            layers = {int(l): v for l, v in d["layers"].items()}
            return cls(layout, d["architecture"], d["num_layers"], d["num_experts"],
                       {l: v["file"] for l, v in layers.items()},
                       {l: [ExpertRecord(**r) for r in v["experts"]] for l, v in layers.items()})
        except (KeyError, TypeError, ValueError) as e:
            raise ModelLoadError(f"{path} is malformed ({type(e).__name__}: {e})") from None
