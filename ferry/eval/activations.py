"""Recording what the router sends each expert (the calibration of `--expert-bits auto`).

The model runs in memory, unquantized, over held-out text once (prompt-only forwards); a routing observer
(ferry.models.routing) keeps, per MoE layer and expert, a uniform sample of at most `max_rows` of the input rows
routed to it (reservoir sampling, seeded) and counts every routed (token, slot) assignment; per layer it keeps a
sample of all inputs too (for experts routed to too rarely to measure on their own rows). Memory is bounded by
rows x D x 4 bytes x (experts + 1) x MoE layers whatever the text's length.

The text is the eval's held-out text, and its tail is used: `ferry eval` scores perplexity on its head (the first
--ppl-tokens tokens, 16384 by default, of ~58k), so the formats are not chosen on the tokens they are judged on.
Legend: T tokens of a forward, D hidden, A experts per token, n sampled rows."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from ferry.engine.llm import LLM
from ferry.errors import InvalidRequest
from ferry.experts.bitwidth import Calibration
from ferry.request import SamplingParams


class Reservoir:
    """A uniform sample of at most `cap` rows of everything added (Vitter's algorithm R), seeded."""

    def __init__(self, cap: int, generator: torch.Generator) -> None:
        self.cap = cap
        self.gen = generator
        self.rows: torch.Tensor | None = None  # [n, D] float32, n <= cap
        self.seen = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.float()
        if self.rows is None:
            self.rows = x.new_empty(0, x.shape[1])
        fill = min(max(self.cap - self.rows.shape[0], 0), x.shape[0])
        if fill:
            self.rows = torch.cat([self.rows, x[:fill]])
        rest = x.shape[0] - fill
        if rest:  # row number s (0-based) replaces a uniform slot with probability cap / (s + 1)
            numbers = torch.arange(self.seen + fill, self.seen + x.shape[0], dtype=torch.float64) + 1
            slots = (torch.rand(rest, generator=self.gen, dtype=torch.float64) * numbers).long()
            for i in torch.nonzero(slots < self.cap).flatten().tolist():
                self.rows[slots[i]] = x[fill + i]
        self.seen += x.shape[0]


class ExpertInputRecorder:
    """A routing observer: per (layer, expert) a Reservoir of its input rows and its assignment count."""

    wants_stream = False

    def __init__(self, max_rows: int, seed: int = 0) -> None:
        self.max_rows = max_rows
        self.gen = torch.Generator().manual_seed(seed)
        self.samples: dict[tuple[int, int], Reservoir] = {}
        self.layers: dict[int, Reservoir] = {}
        self.counts: dict[tuple[int, int], int] = {}

    def routed(self, layer: int, x: torch.Tensor, top_ids: torch.Tensor, top_w: torch.Tensor) -> None:
        """x [T, D] routed to top_ids [T, A]."""
        self.layers.setdefault(layer, Reservoir(self.max_rows, self.gen)).add(x)
        ids = top_ids.flatten()
        counts = torch.bincount(ids)
        for e in torch.nonzero(counts).flatten().tolist():
            key = (layer, e)
            self.counts[key] = self.counts.get(key, 0) + int(counts[e])
            rows = (top_ids == e).any(dim=-1)
            self.samples.setdefault(key, Reservoir(self.max_rows, self.gen)).add(x[rows])

    def layer_done(self, layer: int, stream: torch.Tensor) -> None:
        """Not called (wants_stream is False)."""

    def calibration(self, source: str) -> Calibration:
        return Calibration({k: r.rows for k, r in self.samples.items()}, dict(self.counts),
                           {l: r.rows for l, r in self.layers.items()}, source)


def record_expert_inputs(model: str, text: Path, num_tokens: int = 8192, max_rows: int = 128,
                         dtype: str = "float32", seed: int = 0, window: int = 512) -> Calibration:
    """Run model (resident experts, unquantized, in dtype) over the last num_tokens tokens of text and return
    what its routers sent each expert (module docstring); progress goes to stderr."""
    if num_tokens < 1 or max_rows < 1:
        raise InvalidRequest(f"calibration needs at least one token and one row per expert, got {num_tokens} "
                             f"tokens and {max_rows} rows")
    if not Path(text).is_file():
        raise InvalidRequest(f"held-out text not found: {text} (pass --text FILE)")
    with LLM(model, dtype=dtype) as llm:
        if llm.view().moe is None:
            raise InvalidRequest(f"{model} has no experts; --expert-bits is for MoE models")
        ids = llm.tokenizer.encode(Path(text).read_text(), add_special_tokens=False)[-num_tokens:]
        if len(ids) < 2:
            raise InvalidRequest(f"{text} holds fewer than 2 tokens; give a longer held-out text")
        window = min(window, llm.view().max_model_len - 1)
        chunks = [ids[i:i + window] for i in range(0, len(ids), window)]
        recorder = ExpertInputRecorder(max_rows, seed)
        print(f"recording expert inputs: {len(ids)} tokens of {Path(text).name} in {len(chunks)} windows "
              f"(at most {max_rows} rows per expert)", file=sys.stderr, flush=True)
        llm.engine.routing.add(recorder)
        try:
            llm.generate([{"prompt_token_ids": c} for c in chunks], SamplingParams(max_tokens=1, temperature=0),
                         use_tqdm=True)
        finally:
            llm.engine.routing.remove(recorder)
    return recorder.calibration(f"{Path(text).name}: last {len(ids)} tokens, <= {max_rows} rows per expert")
