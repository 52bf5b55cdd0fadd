"""`--speculative-method draft`: a small model with the target's tokenizer proposes the next tokens of each
decoding request, greedily, k forwards per step for all requests at once (the first one also catches up on the
tokens the target verified since). It has its own model, block pool and runner (full KV policy, no prefix cache);
its KV follows each request like the target's: before proposing, it is rolled back to the longest prefix it
shares with the request's verified tokens (KVCacheManager.rollback), so a rejected draft is never built on."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ferry.config import EngineConfig, KVOptions, ModelConfig
from ferry.errors import InvalidRequest
from ferry.kvcache.manager import KVCacheManager
from ferry.kvcache.policies.base import KVShape
from ferry.kvcache.policies.full import FullPolicy
from ferry.models.loader import load_model
from ferry.plan import ScheduledReq, StepPlan
from ferry.request import Request, SamplingParams
from ferry.runner.kv import BlockLayout, build_policy_kv
from ferry.runner.runner import Runner
from ferry.sampling import Sampler
from ferry.tokenizer import Tokenizer

GREEDY = SamplingParams(temperature=0.0, max_tokens=None)
KV_SHARE = 4  # the draft's KV gets at most 1/KV_SHARE of --kv-cache-memory


def check_vocabulary(draft: Tokenizer, draft_cfg: ModelConfig, target: Tokenizer, target_cfg: ModelConfig,
                     path: str) -> None:
    """A draft must speak the target's token ids: the same tokenizer vocabulary and the same vocab size."""
    dv, tv = draft.hf.get_vocab(), target.hf.get_vocab()
    if dv != tv or draft_cfg.vocab_size != target_cfg.vocab_size:
        differ = sum(1 for t, i in dv.items() if tv.get(t) != i) + sum(1 for t in tv if t not in dv)
        raise InvalidRequest(
            f"speculative_model {path} has a different vocabulary from the model (vocab size {draft_cfg.vocab_size} "
            f"vs {target_cfg.vocab_size}, {differ} tokens differ): a draft model must use the model's tokenizer")


@dataclass
class _Seq:
    """What the draft has computed of one request: a Request of its own for its KV manager."""

    req: Request
    num_fed: int = 0  # of req.all_token_ids, the draft's own guesses at the end (not verified)


class DraftModelProposer:
    name = "draft"

    def __init__(self, runner: Runner, kv: KVCacheManager, block_size: int) -> None:
        self.runner = runner
        self.kv = kv
        self.block_size = block_size
        self.seqs: dict[str, _Seq] = {}

    @classmethod
    def load(cls, path: str, target_cfg: ModelConfig, target_tok: Tokenizer, dtype: torch.dtype,
             device: torch.device, cfg: EngineConfig, max_model_len: int) -> DraftModelProposer:
        try:
            draft_cfg = ModelConfig.from_hf(path)
            draft_tok = Tokenizer.load(path)
        except (OSError, ValueError, KeyError) as e:
            raise InvalidRequest(f"cannot load speculative_model {path}: {e}") from None
        check_vocabulary(draft_tok, draft_cfg, target_tok, target_cfg, path)
        bs = cfg.cache.block_size
        policy = FullPolicy(KVOptions(), KVShape(draft_cfg.num_layers, draft_cfg.num_kv_heads, draft_cfg.head_dim, bs,
                                                 torch.empty(0, dtype=dtype).element_size()))
        wanted = cfg.scheduler.max_num_seqs * (-(-max_model_len // bs) + 1)
        num_blocks = max(1, min(wanted, cfg.cache.kv_cache_memory // KV_SHARE // policy.device_bytes_per_block()))
        model = load_model(draft_cfg, dtype, device, min(max_model_len, draft_cfg.max_model_len))
        storage = build_policy_kv(policy, BlockLayout(draft_cfg, num_blocks, 0, bs, dtype, device))
        kv = KVCacheManager(num_blocks, bs, enable_prefix_caching=False, policy=policy)
        return cls(Runner(model, storage, Sampler([]), bs, device), kv, bs)

    def propose(self, reqs: Sequence[Request], max_tokens: Sequence[int]) -> list[list[int]]:
        seqs = [self._sync(r) for r in reqs]
        out: list[list[int]] = [[] for _ in reqs]
        live = list(range(len(reqs)))
        for depth in range(max(max_tokens, default=0)):
            live = [i for i in live if len(out[i]) == depth and max_tokens[i] > depth]
            plan = self._depth_plan([seqs[i] for i in live])
            if not plan.reqs:
                break
            result = self.runner.execute(plan)
            for i in live:
                token = result.sampled_token_ids.get(reqs[i].req_id)
                if token is not None:
                    out[i].append(self._take(seqs[i], token))
        return out

    def _depth_plan(self, seqs: Sequence[_Seq]) -> StepPlan:
        """One greedy step of the draft model for seqs: each feeds what it has not computed and samples one token
        (a sequence the draft's KV has no room for sits the step out)."""
        plan = StepPlan()
        for seq in seqs:
            s = seq.req
            table = self.kv.allocate_slots(s, s.num_tokens - s.num_computed_tokens)
            if table is None:  # no room in the draft's KV: this request gets what it has
                continue
            start = s.num_computed_tokens
            plan.reqs.append(ScheduledReq(s.req_id, s.all_token_ids[start:], start, list(table), True, GREEDY,
                                          s.all_token_ids, s.num_tokens))
        return plan

    @staticmethod
    def _take(seq: _Seq, token: int) -> int:
        """seq computed its tokens and sampled `token`: the draft's own guess, appended."""
        seq.req.num_computed_tokens = seq.req.num_tokens
        seq.req.all_token_ids.append(token)
        seq.num_fed += 1
        return token

    def _sync(self, req: Request) -> _Seq:
        """The draft's sequence for req, its KV rolled back to what it shares with req's verified tokens."""
        seq = self.seqs.get(req.req_id)
        if seq is None:
            seq = self.seqs[req.req_id] = _Seq(Request(req.req_id, [], GREEDY, 0.0))
        mine, theirs = seq.req.all_token_ids, req.all_token_ids
        # mine is req's tokens at the last sync (they only grow) and then the draft's num_fed guesses: only those
        # can differ
        limit = min(seq.req.num_computed_tokens, len(theirs))
        common = min(len(mine) - seq.num_fed, limit)
        while common < limit and mine[common] == theirs[common]:
            common += 1
        seq.req.num_computed_tokens = min(common, len(theirs) - 1)  # at least one token to feed
        self.kv.rollback(seq.req)
        seq.req.all_token_ids = list(theirs)
        seq.num_fed = 0
        return seq

    def observe(self, req: Request, num_new_tokens: int) -> None:
        pass

    def held(self) -> dict:
        """What the draft model holds now (engine stats): KV blocks and sequences; both 0 when nothing runs."""
        return {"draft_kv_blocks_used": self.kv.pool.num_used, "draft_sequences": len(self.seqs)}

    def release(self, req_id: str) -> None:
        seq = self.seqs.pop(req_id, None)
        if seq is not None:
            self.kv.free(seq.req)
