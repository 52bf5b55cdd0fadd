"""Builds the speculator of --speculative-method (ferry/speculative/): its proposer (route: the small model and the
router), and the row limit under which a verification step computes every row exactly as a one-row decode step
would."""
from __future__ import annotations

import torch

from ferry.config import EngineConfig, ModelConfig
from ferry.ops import gemv
from ferry.speculative import Speculator
from ferry.speculative.ngram import NgramProposer
from ferry.speculative.phrase import PhraseProposer
from ferry.tokenizer import Tokenizer


def exact_rows(dtype: torch.dtype, device: torch.device) -> int | None:
    """The most rows a step may have for each row's linears to give the bits they give alone (None: no such
    limit is known, the path is not batch-invariant). ferry/ops/gemv's kernel computes a row the same way for any
    M up to its MAX_M (16), at every instruction-set level (ops/qgemv's int8/int4 kernel too, up to its larger
    MAX_M); above it torch's F.linear, whose reduction order depends on M. Where the kernel cannot be built (no
    compiler) every linear is F.linear, not exact: bench/speculative.py measures the agreement there."""
    if device.type != "cpu" or not gemv.available() or not gemv.supported_dtypes().get(dtype, False):
        return None
    return gemv.MAX_M[dtype]


def build_speculator(cfg: EngineConfig, model_cfg: ModelConfig, tokenizer: Tokenizer, dtype: torch.dtype,
                     device: torch.device, max_model_len: int) -> Speculator | None:
    spec = cfg.speculative
    if spec.method is None:
        return None
    if spec.method == "ngram":
        proposer = NgramProposer(spec.prompt_lookup_min, spec.prompt_lookup_max)
    elif spec.method == "phrase":
        proposer = PhraseProposer(spec.prompt_lookup_min, spec.prompt_lookup_max)
    elif spec.method == "route":
        from ferry.engine.route import RouteProposer
        from ferry.speculative.route import RouteSpeculator, Router
        router = Router.load(spec.route_router)
        small = RouteProposer.load(spec.model, model_cfg, tokenizer, dtype, device, cfg, max_model_len)
        return RouteSpeculator(small, spec.num_tokens, exact_rows(dtype, device), router, spec.route_threshold)
    else:
        from ferry.engine.draft import DraftModelProposer  # torch model code only when a draft model is asked for
        proposer = DraftModelProposer.load(spec.model, model_cfg, tokenizer, dtype, device, cfg, max_model_len)
    return Speculator(proposer, spec.num_tokens, exact_rows(dtype, device))
