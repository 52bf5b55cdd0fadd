"""`spans`: KV divided into spans (one block = one span); only the attention sinks and a local window stay in the
fast tier, every older span moves to host blocks with a representative in a fast-tier index; each decode query
attends to the resident blocks plus the top-k host spans its index scores pick (Ltri-LLM / InfLLM retrieval,
with Quest's per-channel min/max bound as the representative, which cannot miss a span holding a key whose
score beats it).

Scheduler side: which blocks go cold (everything past the sinks and older than the window) and how many spans a
query (or a prefill chunk, as one) retrieves for the budget."""
from __future__ import annotations

from ferry.kvcache.policies.base import (NO_DECISIONS, BudgetOptions, KVPolicy, plain_kv, register_kv_policy,
                                        resolve_budget, window_tokens)
from ferry.plan import BlockTensor, KVStep, is_host


@register_kv_policy
class SpansPolicy(KVPolicy):
    name = "spans"
    summary = ("spans (sinks + window on device, older spans in host memory, decode reads the top-k by a key "
               "index)")
    Options = BudgetOptions
    uses_host_tier = True
    needs_full_attention = True
    per_request_budget = True

    @property
    def sink_blocks(self) -> int:
        return -(-self.options.sink_tokens // self.shape.block_size)

    def window_blocks(self, ctx_len: int) -> int:
        return -(-window_tokens(self.options, ctx_len) // self.shape.block_size)

    def block_tensors(self) -> list[BlockTensor]:
        s = self.shape
        # per host block, in the fast tier: min and max keys per layer and kv head, in the KV dtype (2 / block_size
        # of the keys' bytes), written when the block goes cold
        index = BlockTensor("index", (s.num_layers, 2), (s.num_kv_heads, s.head_dim), "model", device=False,
                            host="fast")
        return [plain_kv(s), index]

    def cold_blocks(self, num_computed_tokens: int, num_blocks: int) -> range:
        # full blocks older than the window; the partial last block is never cold (the next tokens go there)
        end = min(num_blocks, num_computed_tokens // self.shape.block_size - self.window_blocks(num_computed_tokens))
        return range(self.sink_blocks, max(self.sink_blocks, end))

    def read_tokens(self, ctx_len: int) -> int:
        resident = (self.sink_blocks + self.window_blocks(ctx_len) + 1) * self.shape.block_size
        return min(ctx_len, max(resident, resolve_budget(self.options.budget, ctx_len)))

    def top_k(self, ctx_len: int, num_resident_blocks: int) -> int:
        """Host spans a decode query retrieves: the budget minus what it reads from resident blocks anyway."""
        bs = self.shape.block_size
        return max(0, -(-self.read_tokens(ctx_len) // bs) - num_resident_blocks)

    def plan_step(self, start_pos: int, num_new: int, block_ids: list[int]) -> KVStep:
        """A request with cold blocks reads the top-k host spans: a decode query the budget minus its resident
        blocks, a prefill chunk (as one query) the budget minus sinks, window and the block being filled."""
        if not any(is_host(e) for e in block_ids):
            return NO_DECISIONS
        ctx = start_pos + num_new
        if num_new == 1:
            resident = sum(e >= 0 for e in block_ids[:-(-ctx // self.shape.block_size)])
        else:
            resident = self.sink_blocks + self.window_blocks(ctx) + 1
        return KVStep(num_host_reads=self.top_k(ctx, resident))
