"""The block tensors of a KV policy, allocated once from its declaration (ferry.plan.BlockTensor, listed by the
policy's scheduler half), sized from the byte budget, never grown; and what every policy does with them alike:
swap (copy blocks between the tiers), migration export/import (a request's blocks to plain CPU tensors and back).
Also BlockLayout (what they are allocated for) and KVStorage (the plain K/V view several policies read).
Legend: L layers, N device blocks, Nh host blocks, bs block size, K kv heads, Dh head dim.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ferry.config import ModelConfig
from ferry.plan import BlockTensor

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "int8": torch.int8,
          "uint8": torch.uint8}


@dataclass(frozen=True)
class BlockLayout:
    """The model's KV shape, the block counts of both tiers (from the byte budgets), dtype and device."""

    model: ModelConfig
    num_blocks: int
    num_host_blocks: int
    block_size: int
    dtype: torch.dtype
    device: torch.device


def _nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def block_runs(pairs: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """(source start, destination start, length) of the runs of consecutive (source, destination) block pairs where
    both ids go up by one; every pair lands in exactly one run, in the order given (a plan may copy to the same
    block twice, the later copy winning: the order is kept). Block groups (FastSwitch): a swap copies each run at
    once instead of block by block. The KV manager makes runs likely: a swap lists its pairs by ascending device id
    with ascending host ids, and the host pool hands out its lowest free ids first."""
    runs: list[tuple[int, int, int]] = []
    for src, dst in pairs:
        if runs:
            s, d, n = runs[-1]
            if src == s + n and dst == d + n:
                runs[-1] = (s, d, n + 1)
                continue
        runs.append((src, dst, 1))
    return runs


def _copy_blocks(src: torch.Tensor, dst: torch.Tensor, dim: int, src_ids: torch.Tensor, dst_ids: torch.Tensor) -> None:
    """dst's blocks dst_ids [n] (along dim) = src's blocks src_ids [n], one copy per run of contiguous blocks (block
    groups), no temporary. Measured (bench/swap_copy.py, noisy shared machine): 12-35x faster than the gather + scatter
    (index_select / index_copy_) it replaces for contiguous blocks, and no worse than it for scattered blocks at 256
    blocks (runs of one: a copy per block, which beat the gather's temporary there)."""
    for s, d, n in block_runs(list(zip(src_ids.tolist(), dst_ids.tolist()))):
        dst.narrow(dim, d, n).copy_(src.narrow(dim, s, n).to(dst.device))


class BlockTensors:
    """device[name]: lead + (N,) + per_block, per device block; host[name] / fast[name]: lead + (Nh,) + per_block,
    per host block, in host memory (the slow tier) or beside the device blocks (an index over host blocks)."""

    def __init__(self, specs: list[BlockTensor], layout: BlockLayout) -> None:
        self.specs = {s.name: s for s in specs}
        if len(self.specs) != len(specs):
            raise ValueError(f"block tensors declared twice: {[s.name for s in specs]}")
        pin = layout.device.type == "cuda"
        self.device, self.host, self.fast = {}, {}, {}
        for s in specs:
            dtype = layout.dtype if s.dtype == "model" else DTYPES[s.dtype]

            def alloc(n: int, where: torch.device | str, pinned: bool = False) -> torch.Tensor:
                shape = (*s.lead, n, *s.per_block)
                return torch.full(shape, s.fill, dtype=dtype, device=where, pin_memory=pinned)

            if s.device:
                self.device[s.name] = alloc(layout.num_blocks, layout.device)
            if s.host == "host":
                self.host[s.name] = alloc(layout.num_host_blocks, "cpu", pin and layout.num_host_blocks > 0)
            elif s.host == "fast":
                self.fast[s.name] = alloc(layout.num_host_blocks, layout.device)

    @property
    def nbytes(self) -> int:
        """Fast-tier bytes: device blocks and the index over host blocks."""
        return _nbytes(self.device) + _nbytes(self.fast)

    @property
    def host_nbytes(self) -> int:
        return _nbytes(self.host)

    def _counterparts(self) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """(block dim, device tensor, its tensor per host block) of every tensor a swap copies."""
        return [(len(self.specs[n].lead), t, self.host.get(n, self.fast.get(n))) for n, t in self.device.items()
                if self.specs[n].host is not None]

    def swap_out(self, dev: torch.Tensor, host: torch.Tensor) -> None:
        """Copy device blocks dev [n] to host blocks host [n] (every declared tensor with a counterpart)."""
        for dim, d, h in self._counterparts():
            _copy_blocks(d, h, dim, dev, host)

    def swap_in(self, host: torch.Tensor, dev: torch.Tensor) -> None:
        for dim, d, h in self._counterparts():
            _copy_blocks(h, d, dim, host, dev)

    def export_blocks(self, block_ids: list[int]) -> dict[str, torch.Tensor]:
        """The device blocks block_ids (a request's, in table order) as plain CPU tensors, one per declared device
        tensor: lead + (len(block_ids),) + per_block. What live migration sends."""
        out = {}
        for name, t in self.device.items():
            dim = len(self.specs[name].lead)
            out[name] = t.index_select(dim, torch.tensor(block_ids, dtype=torch.long, device=t.device)).cpu()
        return out

    def import_blocks(self, block_ids: list[int], data: dict[str, torch.Tensor]) -> None:
        """Write export_blocks' tensors into device blocks block_ids (a destination's fresh blocks, same order)."""
        if set(data) != set(self.device):
            raise ValueError(f"import of blocks {sorted(data)} into a policy holding {sorted(self.device)}")
        for name, t in self.device.items():
            dim = len(self.specs[name].lead)
            t.index_copy_(dim, torch.tensor(block_ids, dtype=torch.long, device=t.device), data[name].to(t.device))


class KVStorage:
    """The plain K/V blocks ("kv", [L, 2, N, bs, K, Dh]) of a policy that declares them, and their host copies."""

    def __init__(self, blocks: BlockTensors) -> None:
        self.kv = blocks.device["kv"]
        self.host = blocks.host.get("kv")
        self.layers = [(self.kv[i, 0], self.kv[i, 1]) for i in range(self.kv.shape[0])]

