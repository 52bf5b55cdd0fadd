"""`spans`: KV divided into spans (one block = one span); only the attention sinks and a local window stay in the
fast tier, every older span moves to host blocks with a representative in a fast-tier index; each decode query
attends to the resident blocks plus the top-k host spans its index scores pick (Ltri-LLM / InfLLM retrieval,
with Quest's per-channel min/max bound as the representative, which cannot miss a span holding a key whose
score beats it).

Scheduler side: which blocks go cold (everything past the sinks and older than the window) and how many spans a
query (or a prefill chunk, as one) retrieves for the budget."""
from __future__ import annotations

from ferry.kvcache.policies.base import KVPolicy, resolve_budget, window_tokens


class SpansPolicy(KVPolicy):
    name = "spans"
    options = frozenset({"budget", "sink_tokens", "window_tokens"})
    uses_host_tier = True
    per_request_budget = True

    @property
    def sink_blocks(self) -> int:
        return -(-self.cfg.sink_tokens // self.shape.block_size)

    def window_blocks(self, ctx_len: int) -> int:
        return -(-window_tokens(self.cfg, ctx_len) // self.shape.block_size)

    def index_bytes_per_host_block(self) -> int:
        s = self.shape
        # min and max keys per layer and kv head, in the KV dtype: 2 / block_size of the keys' bytes
        return 2 * s.num_layers * s.num_kv_heads * s.head_dim * s.dtype_bytes

    def cold_blocks(self, num_computed_tokens: int, num_blocks: int) -> range:
        # full blocks older than the window; the partial last block is never cold (the next tokens go there)
        end = min(num_blocks, num_computed_tokens // self.shape.block_size - self.window_blocks(num_computed_tokens))
        return range(self.sink_blocks, max(self.sink_blocks, end))

    def read_tokens(self, ctx_len: int) -> int:
        resident = (self.sink_blocks + self.window_blocks(ctx_len) + 1) * self.shape.block_size
        return min(ctx_len, max(resident, resolve_budget(self.cfg.budget, ctx_len)))

    def top_k(self, ctx_len: int, num_resident_blocks: int) -> int:
        """Host spans a decode query retrieves: the budget minus what it reads from resident blocks anyway."""
        bs = self.shape.block_size
        return max(0, -(-self.read_tokens(ctx_len) // bs) - num_resident_blocks)
