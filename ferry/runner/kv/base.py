"""The KV policy interface, tensor side: the block tensors a policy keeps and how each layer reads them.

The model's attention layer calls `layer_kv.attend(q, k, v, meta, scale, window)` and knows nothing else: the
policy writes this step's K/V the way it stores them (plain, quantized, ...) and returns the attention output
over whatever part of each request's context it decides a query reads. The runner calls `swap_out` / `swap_in`
with the plan's block copies (preemption, and blocks a policy moved to the slow tier) before the forward.
The scheduler-side half of each policy is ferry/kvcache/policies/<name>.py; this side never imports it: the
decisions of a step come in the plan (ferry/plan.py KVStep, per request: AttnMetadata.decode_kv, PrefillChunk.kv),
and a tensor half is built once from the scheduler half's policy object for its static sizes and options.
Legend: T tokens in the step, H query heads, K kv heads, Dh head dim, D hidden size.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from ferry.models.layers.attention import AttnMetadata, LayerKV
from ferry.plan import StepPlan
from ferry.runner.kv.storage import BlockLayout, BlockTensors, KVStorage

# family -> tensor half (a scheduler-side policy names its family: `layer-budget+int8` runs `layer-budget`'s)
POLICY_KV: dict[str, Callable[..., PolicyKV]] = {}


def register_policy_kv(family: str) -> Callable[[type[PolicyKV]], type[PolicyKV]]:
    """Class decorator: the tensor half of the policies of this family, built as cls(policy, layout[, blocks])."""
    def register(cls: type[PolicyKV]) -> type[PolicyKV]:
        if family in POLICY_KV:
            raise ValueError(f"two tensor halves for KV policy family {family!r}")
        POLICY_KV[family] = cls
        return cls
    return register


def build_policy_kv(policy: Any, layout: BlockLayout) -> PolicyKV:
    """The tensor half of a scheduler-side policy (ferry/kvcache/policies/; read for its family, options and static
    sizes only), allocated for layout."""
    return POLICY_KV[policy.tensor_family](policy, layout)


class PolicyKV:
    """Owns every layer's KV tensors, in both tiers: the block tensors its policy declares (BlockTensors), allocated
    once from the byte budgets, never grown. Swap and migration are the same for every policy (storage.py); a
    policy that derives an index when a block goes cold adds it in before_swap_out."""

    layers: list[LayerKV]

    def __init__(self, policy: Any, layout: BlockLayout, blocks: BlockTensors | None = None) -> None:
        """blocks: tensors already allocated for a wrapping policy (layer-budget over this one) that declares them."""
        self.blocks = blocks if blocks is not None else BlockTensors(policy.block_tensors(), layout)

    @property
    def nbytes(self) -> int:
        """Fast-tier bytes held (KV blocks plus any index or scales): what --kv-cache-memory pays for."""
        return self.blocks.nbytes

    @property
    def host_nbytes(self) -> int:
        """Slow-tier bytes held (swap space, offloaded spans)."""
        return self.blocks.host_nbytes

    def swap_out(self, pairs: list[tuple[int, int]]) -> None:
        """Copy device blocks to host blocks: (device, host) pairs."""
        if pairs:
            dev, host = (torch.tensor(x) for x in zip(*pairs))
            self.before_swap_out(dev, host)
            self.blocks.swap_out(dev, host)

    def swap_in(self, pairs: list[tuple[int, int]]) -> None:
        """Copy host blocks to device blocks: (host, device) pairs."""
        if pairs:
            host, dev = (torch.tensor(x) for x in zip(*pairs))
            self.blocks.swap_in(host, dev)

    def before_swap_out(self, dev: torch.Tensor, host: torch.Tensor) -> None:
        """Device blocks dev [n] go to host blocks host [n] (still intact on the device): a policy with an index over
        host blocks (spans, shadow) writes its entries here. Default: nothing."""

    def export_blocks(self, block_ids: list[int]) -> dict[str, torch.Tensor]:
        """A request's device blocks as plain CPU tensors (live migration; storage.BlockTensors.export_blocks)."""
        return self.blocks.export_blocks(block_ids)

    def import_blocks(self, block_ids: list[int], data: dict[str, torch.Tensor]) -> None:
        self.blocks.import_blocks(block_ids, data)

    def prepare(self, plan: StepPlan) -> None:
        """Changes the plan asks of the KV tensors once, before its forward (Runner.prepare): a forward may be run
        again on part of the step (a failing request is isolated, ferry/engine/isolation.py), and must then find the
        tensors as they were, so nothing here may happen inside it. Default: nothing."""

    def begin_step(self, meta: AttnMetadata) -> Any:
        """What the policy's layers share in this step, built once before the first layer (AttnMetadata.kv_state; a
        dataclass of the policy's own). Default: nothing."""
        return None

    def forward(self, model: torch.nn.Module, input_ids: torch.Tensor, meta: AttnMetadata,
                logits_indices: torch.Tensor) -> torch.Tensor:
        """The model's forward over these KV layers (the runner calls it): the decoder's own loop, unless the policy
        drives the layers itself (lazy changes the rows between them)."""
        return model(input_ids, meta, self.layers, logits_indices)

    def bind_model(self, model: torch.nn.Module) -> None:
        """Called once with the loaded model, before any step: a policy that derives state from the weights (shadow's
        key basis) takes it here. Default: nothing."""


class StorageKV(PolicyKV):
    """A policy whose K/V live in plain blocks (storage.KVStorage: the declared "kv" tensor), plus whatever it adds."""

    def __init__(self, policy: Any, layout: BlockLayout, blocks: BlockTensors | None = None) -> None:
        super().__init__(policy, layout, blocks)
        self.storage = KVStorage(self.blocks)


def gather_blocks(cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """cache [num_blocks, bs, K, Dh], block_ids [..., n] -> [..., n * bs, K, Dh] (a copy)."""
    return cache[block_ids].flatten(-4, -3)
