"""`ferry eval MODEL --expert-bits auto --expert-store-size SIZE`: quality next to size for quantized expert stores.

One table: the model with its experts in memory at full precision, then expert stores written into a scratch folder
(every expert in RAM, so only the formats differ): uniform int8, uniform int4, `--expert-bits auto` at SIZE chosen
on inputs recorded from the held-out text's tail, and the same allocation at SIZE ranked on Gaussian inputs (what
recording changes). Each row: the store's bytes, perplexity on the text's head, its change against full precision,
and the greedy top-1 agreement per token with full precision (suite.eval_perplexity). Every run uses the store's
dtype, so the only difference between rows is the experts' formats."""
from __future__ import annotations

import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ferry.config import ModelConfig
from ferry.engine.llm import LLM
from ferry.eval import metrics
from ferry.eval.activations import record_expert_inputs
from ferry.eval.suite import SETUP_OPTIONS, EvalConfig, _text_ids, eval_perplexity
from ferry.experts.bitwidth import Calibration
from ferry.experts.convert import check_store_size, convert_expert_store, plan_expert_bits, store_dtype
from ferry.experts.layout import ExpertLayout


@dataclass
class BitsRow:
    label: str
    nbytes: int  # expert records (full precision: those of a `--expert-bits none` store)
    perplexity: float
    perplexity_change: float  # against full precision
    top1_agreement: float  # with full precision, per token
    formats: str = ""  # e.g. "26 int4, 6 int8"


def _run(model: str, options: dict[str, Any], cfg: EvalConfig) -> tuple[float, list[int]]:
    top1: list[int] = []
    with LLM(model, **options) as llm:
        ppl = eval_perplexity(llm, _text_ids(llm, cfg), cfg, top1)["perplexity"]
    return ppl, top1


def compare_expert_bits(model: str, size: int, options: dict[str, Any], cfg: EvalConfig,
                        calibration_tokens: int = 8192, calibration_rows: int = 128) -> list[BitsRow]:
    """The rows of the table above (options: engine options; only setup ones are kept, dtype set to the store's)."""
    mcfg = ModelConfig.from_hf(model)
    dtype = store_dtype(options.get("dtype", "auto") if options.get("dtype") in ("float32", "bfloat16") else "auto",
                        mcfg)
    check_store_size(model, size, dtype)
    opts = {**{k: v for k, v in options.items() if k in SETUP_OPTIONS}, "dtype": dtype}
    base_ppl, base_top1 = _run(model, opts, cfg)
    layout = ExpertLayout.for_shape(dtype, mcfg.hidden_size, mcfg.moe.intermediate_size)
    dense = layout.record_nbytes * mcfg.moe.num_experts * sum(mcfg.moe.sparse_layers)  # as `--expert-bits none`
    rows = [BitsRow("full precision, in memory", dense, base_ppl, 0.0, 1.0, dtype)]
    real = record_expert_inputs(model, cfg.text, calibration_tokens, calibration_rows, "float32")
    moe_layers = [l for l in range(mcfg.num_layers) if mcfg.moe.sparse_layers[l]]
    gauss = Calibration.gaussian(moe_layers, mcfg.moe.num_experts, mcfg.hidden_size, calibration_rows)
    variants = [("uniform int8", "8", None), ("uniform int4", "4", None),
                (f"auto, recorded inputs, {size / 2**20:.2f} MiB", "auto", real),
                (f"auto, Gaussian inputs, {size / 2**20:.2f} MiB", "auto", gauss)]
    with tempfile.TemporaryDirectory(prefix="ferry-eval-bits-") as tmp:
        for i, (label, bits, calibration) in enumerate(variants):
            print(f"expert bits: {label}", file=sys.stderr, flush=True)
            plan = plan_expert_bits(model, calibration, size, dtype) if calibration is not None else None
            index = convert_expert_store(model, Path(tmp) / f"store{i}", dtype, bits, plan)
            ppl, top1 = _run(model, {**opts, "expert_store": str(Path(tmp) / f"store{i}")}, cfg)
            kinds = [r.bits for recs in index.experts.values() for r in recs]
            formats = ", ".join(f"{kinds.count(b)} {f'int{b}' if b else dtype}" for b in sorted(set(kinds)))
            rows.append(BitsRow(label, index.total_nbytes, ppl, ppl / base_ppl - 1,
                                metrics.acceptance_rate(base_top1, top1), formats))
    return rows


def bits_table(rows: list[BitsRow]) -> str:
    lines = [f"{'experts':<40} {'MiB':>8} {'perplexity':>11} {'vs full':>8} {'top-1 agree':>11}  formats"]
    for r in rows:
        mib = f"{r.nbytes / 2**20:.2f}"
        lines.append(f"{r.label:<40} {mib:>8} {r.perplexity:>11.3f} {r.perplexity_change:>+8.2%} "
                     f"{r.top1_agreement:>11.2%}  {r.formats}")
    return "\n".join(lines)


def bits_json(rows: list[BitsRow]) -> list[dict]:
    return [asdict(r) for r in rows]
