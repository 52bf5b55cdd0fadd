"""``ferry eval``: one model, optionally with engine options, against the same model at full precision.

What runs (each part can be switched off):
- perplexity on held-out text (``prompt_logprobs``), next to a unigram model fitted on that very text;
- retrieval accuracy per task (``ferry.eval.tasks``), context length and needle depth, greedy, exact match;
- with ``--draft``: the greedy acceptance rate of the draft on the target's own continuations;
- for MoE models: each expert's share of tokens and how predictable layer l+1's experts are from layer l's;
- beside the full-precision run: the greedy top-1 agreement per token on the perplexity text (how often the
  model with the options predicts the same next token as the model without them, position by position).

Engine options (a KV policy, quantization, expert offloading...) are the same keywords as ``ferry.LLM``.
When any are given, the model is evaluated twice, with and without them, and the report shows both.
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from ferry.engine.llm import LLM
from ferry.errors import InvalidRequest
from ferry.eval import metrics
from ferry.eval.tasks import TASKS, Haystack, make_sample, is_correct
from ferry.request import SamplingParams

if TYPE_CHECKING:
    import torch

HELDOUT = Path(__file__).resolve().parent.parent / "assets" / "heldout.txt"


@dataclass
class EvalConfig:
    tasks: tuple[str, ...] = TASKS
    lengths: tuple[int, ...] = ()  # default: 512, 1024, ... up to the model's context
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    samples: int = 4  # per (task, length, depth)
    ppl_tokens: int = 16384
    ppl_window: int = 1024
    draft: str | None = None
    draft_tokens: int = 32  # continuation length per prompt for the acceptance rate
    text: Path = HELDOUT
    seed: int = 0
    parts: tuple[str, ...] = ("ppl", "retrieval", "draft", "moe")

    def __post_init__(self) -> None:
        if self.samples < 1 or self.ppl_tokens < 2 or self.draft_tokens < 1:
            raise InvalidRequest("samples and draft tokens must be at least 1, perplexity tokens at least 2")
        if not all(0.0 <= d <= 1.0 for d in self.depths):
            raise InvalidRequest(f"depths must be in [0, 1], got {list(self.depths)}")


@dataclass
class Report:
    model: str
    options: dict[str, Any]
    perplexity: dict | None = None
    retrieval: list[dict] = field(default_factory=list)
    acceptance: dict | None = None
    moe: dict | None = None
    agreement: dict | None = None  # greedy top-1 agreement with the full-precision run (on the perplexity text)
    top1: list[int] | None = field(default=None, repr=False)  # the greedy token at each perplexity position

    def accuracy(self, task: str | None = None, length: int | None = None) -> float:
        rows = [r for r in self.retrieval if (task is None or r["task"] == task) and (length is None or r["length"] == length)]
        return sum(r["correct"] for r in rows) / max(1, sum(r["total"] for r in rows))


def default_lengths(max_len: int) -> tuple[int, ...]:
    out, n = [], 512
    while n <= max_len:
        out.append(n)
        n *= 2
    return tuple(out)


def _text_ids(llm: LLM, cfg: EvalConfig) -> list[int]:
    if not Path(cfg.text).is_file():
        raise InvalidRequest(f"held-out text not found: {cfg.text} (pass --text FILE)")
    return llm.tokenizer.encode(Path(cfg.text).read_text(), add_special_tokens=False)


def eval_perplexity(llm: LLM, ids: list[int], cfg: EvalConfig, top1: list[int] | None = None) -> dict:
    """Perplexity of ids in windows of cfg.ppl_window; top1, when given, gets the greedy next token at every
    scored position (what the top-1 agreement between two runs compares)."""
    window = min(cfg.ppl_window, llm.view().max_model_len - 1)
    ids = ids[:cfg.ppl_tokens]
    chunks = [ids[i:i + window] for i in range(0, len(ids) - 1, window) if len(ids[i:i + window]) > 1]
    outs = llm.generate([{"prompt_token_ids": c} for c in chunks],
                        SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1), use_tqdm=False)
    lps = [lp.logprob for o in outs for lp in o.prompt_logprobs[1:]]
    if top1 is not None:
        top1.extend(lp.top[0][0] for o in outs for lp in o.prompt_logprobs[1:])
    return {"perplexity": metrics.perplexity(lps), "unigram_perplexity": metrics.unigram_perplexity(ids),
            "tokens": len(lps), "window": window}


def eval_retrieval(llm: LLM, ids: list[int], cfg: EvalConfig) -> list[dict]:
    tok = llm.tokenizer
    hay = Haystack(ids)
    max_len = llm.view().max_model_len
    rng = random.Random(cfg.seed)
    lengths = cfg.lengths or default_lengths(max_len - 32)
    too_long = [n for n in lengths if n + 32 > max_len]
    if too_long:
        raise InvalidRequest(f"context lengths {too_long} leave no room for the answer in the model's "
                             f"{max_len}-token context; use at most {max_len - 32}")
    samples = []
    for task in cfg.tasks:
        for length in lengths:
            for depth in cfg.depths:
                for _ in range(cfg.samples):
                    try:
                        samples.append(make_sample(task, _Enc(tok), hay, rng, length, depth))
                    except ValueError as e:  # a length too short for the task
                        raise InvalidRequest(f"{e}; use longer --lengths") from e
    params = [SamplingParams(max_tokens=len(s.answer_ids) + 2, temperature=0) for s in samples]
    outs = llm.generate([{"prompt_token_ids": s.prompt_ids} for s in samples], params, use_tqdm=True)
    cells: dict[tuple, dict] = {}
    for s, o in zip(samples, outs):
        key = (s.task, len(s.prompt_ids), s.depth)
        c = cells.setdefault(key, {"task": s.task, "length": len(s.prompt_ids), "depth": s.depth, "correct": 0, "total": 0})
        c["correct"] += is_correct(s, o.outputs[0].text)
        c["total"] += 1
    return list(cells.values())


class _Enc:
    def __init__(self, tok):
        self.tok = tok

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)


def eval_acceptance(llm: LLM, draft: LLM, ids: list[int], cfg: EvalConfig) -> dict:
    """Target continues held-out prompts greedily; the draft scores those continuations (top-1 = its greedy)."""
    rng = random.Random(cfg.seed)
    prompts = [ids[s:s + 64] for s in (rng.randrange(len(ids) - 64) for _ in range(32))]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(max_tokens=cfg.draft_tokens, temperature=0, ignore_eos=True), use_tqdm=False)
    seqs = [p + o.outputs[0].token_ids for p, o in zip(prompts, outs)]
    scored = draft.generate([{"prompt_token_ids": s} for s in seqs],
                            SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1), use_tqdm=False)
    target, guess = [], []
    for p, s, o in zip(prompts, seqs, scored):
        for pos in range(len(p), len(s)):
            target.append(s[pos])
            guess.append(o.prompt_logprobs[pos].top[0][0])
    return {"acceptance_rate": metrics.acceptance_rate(target, guess), "positions": len(target),
            "draft": cfg.draft}


class RouteRecorder:
    """A routing observer (ferry.models.routing) that keeps each MoE layer's top-k expert ids per forward:
    records[i] = list of [T, k] tensors of the i-th MoE layer in `moe_layers`."""

    wants_stream = False

    def __init__(self, moe_layers: list[int]) -> None:
        self.position = {layer: i for i, layer in enumerate(moe_layers)}
        self.records: list[list] = [[] for _ in moe_layers]

    def routed(self, layer: int, x: torch.Tensor, top_ids: torch.Tensor, top_w: torch.Tensor) -> None:
        self.records[self.position[layer]].append(top_ids.clone())

    def layer_done(self, layer: int, stream: torch.Tensor) -> None:
        """Not called (wants_stream is False)."""


@contextlib.contextmanager
def recording_routes(llm: LLM) -> Iterator[list[list]]:
    """Records each MoE layer's top-k expert ids per forward: yields records[layer] = list of [T, k] tensors."""
    port = llm.engine.routing
    recorder = RouteRecorder([i for i, sparse in enumerate(llm.view().moe.sparse_layers) if sparse])
    port.add(recorder)
    try:
        yield recorder.records
    finally:
        port.remove(recorder)


def eval_moe(llm: LLM, ids: list[int], cfg: EvalConfig) -> dict | None:
    moe_cfg = llm.view().moe
    if moe_cfg is None:
        return None
    window = min(512, llm.view().max_model_len - 1)
    chunks = [ids[i:i + window] for i in range(0, min(len(ids), 8192), window)]
    with recording_routes(llm) as rec:
        for c in chunks:  # one prompt at a time: rows of consecutive layers are the same tokens
            llm.generate([{"prompt_token_ids": c}], SamplingParams(max_tokens=1, temperature=0), use_tqdm=False)
    per_layer = [[row for t in layer for row in t.tolist()] for layer in rec]
    E = moe_cfg.num_experts
    shares = [metrics.expert_shares(layer, E) for layer in per_layer]
    recalls = []
    for a, b in zip(per_layer, per_layer[1:]):
        pairs = list(zip(a, b))
        half = len(pairs) // 2
        recalls.append(metrics.coactivation_recall(pairs[:half], pairs[half:], E, k=4))
    return {"num_experts": E, "top_k": moe_cfg.top_k, "tokens": len(per_layer[0]),
            "expert_share": shares, "min_share": min(min(s) for s in shares),
            "next_layer_top4_recall": recalls, "random_top4_recall": 4 / E}


def evaluate_one(model: str, options: dict[str, Any], cfg: EvalConfig) -> Report:
    report = Report(model, options)
    with LLM(model, **options) as llm:
        ids = _text_ids(llm, cfg)
        if "ppl" in cfg.parts:
            report.top1 = []
            report.perplexity = eval_perplexity(llm, ids, cfg, report.top1)
        if "retrieval" in cfg.parts and cfg.tasks:
            report.retrieval = eval_retrieval(llm, ids, cfg)
        if "draft" in cfg.parts and cfg.draft:
            with LLM(cfg.draft, **options) as draft:
                report.acceptance = eval_acceptance(llm, draft, ids, cfg)
        if "moe" in cfg.parts:
            report.moe = eval_moe(llm, ids, cfg)
    return report


# Options that say how to run, not what to compute: the full-precision baseline keeps them.
SETUP_OPTIONS = frozenset({"device", "dtype", "threads", "seed", "kv_cache_memory", "max_num_seqs",
                           "max_num_batched_tokens", "max_model_len", "block_size"})


def evaluate(model: str, options: dict[str, Any], cfg: EvalConfig) -> list[Report]:
    """[report] — or [full-precision baseline, report with the options] when an option beyond setup is given."""
    setup = {k: v for k, v in options.items() if k in SETUP_OPTIONS}
    reports = [evaluate_one(model, setup, cfg)] if setup != options else []
    reports.append(evaluate_one(model, options, cfg))
    if len(reports) == 2 and reports[0].top1 is not None:
        base, other = reports[0].top1, reports[1].top1
        reports[1].agreement = {"top1_agreement": metrics.acceptance_rate(base, other), "positions": len(base),
                                "perplexity_change": reports[1].perplexity["perplexity"]
                                / reports[0].perplexity["perplexity"] - 1}
    return reports


def to_json(reports: list[Report], cfg: EvalConfig) -> dict:
    c = asdict(cfg)
    c["text"] = str(cfg.text)
    return {"config": c, "reports": [{k: v for k, v in asdict(r).items() if k != "top1"} for r in reports]}
