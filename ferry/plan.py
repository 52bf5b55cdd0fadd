"""The only contract between the scheduler and the runner. Plain data, no torch.

StepPlan: what to compute this step (scheduler -> runner), with every KV policy decision of the step (KVStep).
StepResult: what came out (runner -> scheduler).
Block table entries: b >= 0 is device block b; HOLE < b < 0 is host block -1 - b (host_entry); HOLE is a block
given back after its request's tokens were compacted into fewer blocks (no position maps to it any more).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ferry.request import SamplingParams, TokenLogprob

HOLE = -(1 << 62)


def host_entry(host_block: int) -> int:
    """The block table entry of host block h (and back: host_entry(host_entry(h)) == h)."""
    return -1 - host_block


def is_host(entry: int) -> bool:
    return HOLE < entry < 0


DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1, "uint8": 1}


@dataclass(frozen=True)
class BlockTensor:
    """One tensor a KV policy's blocks hold, declared once by the policy (scheduler side): its bytes per block are
    what the block budget pays, and the tensor side allocates it from this, as lead + (number of blocks,) + per_block.
    A tensor of device blocks (device=True) may have a counterpart per host block, in host memory (host="host": the
    slow tier, copied by swap) or in the fast tier (host="fast": an index queries read without touching the slow
    tier); device=False declares a fast-tier tensor per host block only (derived when a block goes cold)."""

    name: str
    lead: tuple[int, ...]  # dims before the block dim (layers, K/V ...)
    per_block: tuple[int, ...]  # dims after it (tokens of the block, heads, head dim ...)
    dtype: str  # "model" (the KV dtype) or a key of DTYPE_BYTES
    device: bool = True
    host: str | None = "host"  # "host", "fast" or None
    fill: int = 0  # initial value of every element

    def block_bytes(self, model_dtype_bytes: int) -> int:
        """Bytes of one block of this tensor."""
        n = model_dtype_bytes if self.dtype == "model" else DTYPE_BYTES[self.dtype]
        for d in self.lead + self.per_block:
            n *= d
        return n


@dataclass(frozen=True)
class Compaction:
    """Compact a request's region (its whole blocks before this step's token) into the region's first blocks,
    before the step's first write: blocks [kept_blocks, region_blocks) are given back after the step (HOLE)."""

    region_blocks: int  # the whole blocks before the step's token
    kept_blocks: int  # the region's first blocks, which hold every kept cell
    budget: int  # tokens a layer keeps of the region, on average
    sink_tokens: int  # of those, the region's first tokens kept in every layer
    window_tokens: int  # and its last ones kept in every layer


@dataclass(frozen=True)
class KVStep:
    """A KV policy's decisions for one scheduled request in this step (the defaults: read every token, compact
    nothing). The tensor side reads these, never the policy: ferry/kvcache/policies/ decides, ferry/runner/kv/
    executes."""

    num_host_reads: int = 0  # host blocks (cold spans) a query reads, picked by the policy's index
    read_tokens: int | None = None  # context tokens a decode query reads per layer on average (None: all)
    sink_tokens: int = 0  # with read_tokens: the first tokens always read
    window_tokens: int = 0  # with read_tokens: the most recent tokens always read
    compaction: Compaction | None = None  # compact the request's region in this step


@dataclass
class ScheduledReq:
    req_id: str
    token_ids: list[int]  # the tokens whose KV this step computes (a prefill chunk, or one decode token)
    start_pos: int  # position of token_ids[0] = the request's num_computed_tokens before this step
    # the request's whole block table, covering start_pos + len(token_ids): device blocks, and (KV policies with a
    # slow tier) host block h as -1 - h for spans gone cold; this step's new tokens always land in device blocks
    block_ids: list[int]
    sample: bool  # True when this step reaches the end of the known tokens: sample the next one
    params: SamplingParams
    all_token_ids: list[int]  # prompt + output so far (read-only; penalties and seeds need it)
    num_prompt_tokens: int
    seed_offset: int = 0  # child index of an n > 1 request, mixed into its seed
    kv: KVStep = field(default_factory=KVStep)  # the KV policy's decisions for this request in this step
    # speculative decoding: guesses of the tokens after the request's last known one, the tail of token_ids (so
    # token_ids = [last known token] + draft_token_ids). Each of its rows samples as a one-token decode at its
    # position would; the runner keeps the longest prefix the target agrees with, plus the target's next token.
    draft_token_ids: list[int] = field(default_factory=list)
    # route (R2R, lossy; ferry/speculative/route.py): draft_token_ids are the small model's tokens the router let
    # through, all kept (not verified: the target only computes their KV, one decode row each); the token after them
    # is route_next_token (the small model's, let through too: no logits needed) or, None, the target's sample
    route: bool = False
    route_next_token: int | None = None


@dataclass
class StepPlan:
    reqs: list[ScheduledReq] = field(default_factory=list)  # prefill chunks and decodes, mixed
    swap_out: list[tuple[int, int]] = field(default_factory=list)  # (device block, host block): copy before the forward
    swap_in: list[tuple[int, int]] = field(default_factory=list)  # (host block, device block): copy before the forward
    finished_req_ids: list[str] = field(default_factory=list)  # the runner drops per-request state (seeded generators)

    @property
    def num_tokens(self) -> int:
        return sum(len(r.token_ids) for r in self.reqs)

    @property
    def empty(self) -> bool:
        return not self.reqs and not self.swap_out and not self.swap_in


@dataclass
class StepResult:
    sampled_token_ids: dict[str, int] = field(default_factory=dict)  # req_id -> new token, for reqs with sample=True
    logprobs: dict[str, TokenLogprob] = field(default_factory=dict)  # req_id -> logprobs, when params.logprobs is set
    # req_id -> (position of the first scored token, logprobs), when params.prompt_logprobs is set
    prompt_logprobs: dict[str, tuple[int, list[TokenLogprob]]] = field(default_factory=dict)
    # req_id -> the tokens a request with draft tokens (or route) gained: its accepted drafts, then the target's own
    # next token or route_next_token (1 to len(draft_token_ids) + 1 tokens; no entry in sampled_token_ids)
    spec_token_ids: dict[str, list[int]] = field(default_factory=dict)
    # req_id -> the logprobs of those tokens, one each, when params.logprobs is set (each from the row that sampled
    # it: the logprobs a one-token decode step would give)
    spec_logprobs: dict[str, list[TokenLogprob]] = field(default_factory=dict)
