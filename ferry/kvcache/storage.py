"""The KV tensors: one device tensor for every layer's blocks, and host blocks for swapped-out KV.
Allocated once, sized from the byte budget, never grown."""
from __future__ import annotations

import torch

from ferry.config import ModelConfig


class KVStorage:
    def __init__(self, cfg: ModelConfig, num_blocks: int, num_host_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        shape = (cfg.num_layers, 2, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        self.kv = torch.zeros(shape, dtype=dtype, device=device)
        host_shape = (cfg.num_layers, 2, num_host_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        pin = device.type == "cuda"
        self.host = torch.zeros(host_shape, dtype=dtype, pin_memory=pin) if num_host_blocks else None
        self.layers = [(self.kv[i, 0], self.kv[i, 1]) for i in range(cfg.num_layers)]

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    @property
    def host_nbytes(self) -> int:
        return 0 if self.host is None else self.host.numel() * self.host.element_size()

    def swap_out(self, pairs: list[tuple[int, int]]) -> None:
        if pairs:
            dev, host = (torch.tensor(x) for x in zip(*pairs))
            self.host[:, :, host] = self.kv[:, :, dev].to("cpu")

    def swap_in(self, pairs: list[tuple[int, int]]) -> None:
        if pairs:
            host, dev = (torch.tensor(x) for x in zip(*pairs))
            self.kv[:, :, dev.to(self.kv.device)] = self.host[:, :, host].to(self.kv.device)
