"""`--speculative-method route` (R2R, lossy), the small model's half: it generates each greedy decoding request's
next tokens one forward at a time (all requests at once), and the router (ferry/speculative/route.py) looks at each
token's distribution: the run stops at the first token the router sends to the large model, or after max_tokens
drafts plus one more token. The model, block pool, KV rollback and catch-up on the tokens the target produced are
the draft model's (engine/draft.py); only the forward differs: it also reads the top logprobs the router needs."""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from ferry.engine.draft import DraftModelProposer
from ferry.plan import StepPlan
from ferry.request import Request
from ferry.runner.inputs import build_inputs
from ferry.speculative.route import TOP_K, RouteRun, features

Decide = Callable[[Sequence[float]], bool]  # features of a token -> True: the large model produces it


class RouteProposer(DraftModelProposer):
    name = "route"

    def route(self, reqs: Sequence[Request], max_tokens: Sequence[int], decide: Decide) -> list[RouteRun]:
        """Each request's run: up to max_tokens[i] kept tokens, then one more (kept: next_token, or routed: None).
        A request the small model's KV has no room for ends its run there, routed."""
        seqs = [self._sync(r) for r in reqs]
        runs = [RouteRun([], None) for _ in reqs]
        live = list(range(len(reqs)))
        for depth in range(max(max_tokens, default=0) + 1):
            plan = self._depth_plan([seqs[i] for i in live])
            if not plan.reqs:
                break
            tokens, feats = self._forward_apart(plan)
            still = []
            for i in live:
                token = tokens.get(reqs[i].req_id)
                if token is None:  # sat this step out (no KV room): routed
                    continue
                self._take(seqs[i], token)
                if decide(feats[reqs[i].req_id]):
                    continue  # routed: the target produces this position
                if depth < max_tokens[i]:
                    runs[i].tokens.append(token)
                    still.append(i)
                else:
                    runs[i].next_token = token
            live = still
        return runs

    def _forward_apart(self, plan: StepPlan) -> tuple[dict[str, int], dict[str, tuple[float, float, float]]]:
        """_forward, with the one-token rows together and each catch-up chunk (a prompt, tokens after the target's
        routed ones) in a forward of its own: a decode row then computes what it would in a decode-only step (the
        batch-invariant kernels) and a prompt what it would alone, so a request's small-model tokens do not depend
        on which other requests share the step (threshold 1 gives each request the small model's own output)."""
        parts = [StepPlan([r for r in plan.reqs if len(r.token_ids) == 1])]
        parts += [StepPlan([r]) for r in plan.reqs if len(r.token_ids) > 1]
        tokens: dict[str, int] = {}
        feats: dict[str, tuple[float, float, float]] = {}
        for part in parts:
            if part.reqs:
                more_tokens, more_feats = self._forward(part)
                tokens.update(more_tokens)
                feats.update(more_feats)
        return tokens, feats

    @torch.inference_mode()
    def _forward(self, plan: StepPlan) -> tuple[dict[str, int], dict[str, tuple[float, float, float]]]:
        """The small model's greedy token for each request of plan (the sampler's, as a plain decode would pick)
        and the router's features of its distribution there."""
        runner = self.runner
        runner.prepare(plan)
        inputs = build_inputs(plan, self.block_size, runner.device)
        inputs.meta.kv_state = runner.storage.begin_step(inputs.meta)
        logits = runner.storage.forward(runner.model, inputs.input_ids, inputs.meta, inputs.logits_indices)
        # logits: [S, V], one row per request (each samples once)
        tokens, _ = runner.sampler(logits, inputs.sample_reqs)
        k = min(TOP_K, logits.shape[-1])
        top = torch.log_softmax(logits.float(), dim=-1).topk(k, dim=-1).values.tolist()  # [S, k], best first
        ids = [r.req_id for r in inputs.sample_reqs]
        return dict(zip(ids, tokens)), {rid: features(lp) for rid, lp in zip(ids, top)}
