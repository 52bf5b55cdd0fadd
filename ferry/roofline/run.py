"""`ferry roofline`: analyse each workload (decode and/or prefill) for a model on a hardware profile, then run and
time the same steps in one ferry.LLM, and join the two per operator."""
from __future__ import annotations

from dataclasses import asdict
from typing import Callable

from ferry.config import ModelConfig
from ferry.engine.options import engine_config
from ferry.roofline.analysis import Workload, kv_policy, operators, predict
from ferry.roofline.hardware import HardwareProfile
from ferry.roofline.measure import CannotRun, Measured, llm_options, measure, open_llm
from ferry.roofline.report import rows


def analyse(cfg: ModelConfig, w: Workload, hw: HardwareProfile, policy_name: str = "full",
            policy_options: dict | None = None) -> dict:
    """The prediction for workload w as a result dict (no measurement yet)."""
    kv_opts = engine_config(cfg.path or "model", kv_policy=policy_name, **(policy_options or {})).kv_options
    policy = kv_policy(cfg, policy_name, kv_opts, w.dtype)
    preds = predict(operators(cfg, w, policy), hw)
    return {"model": cfg.path, "kv_policy": policy_name, "kv_options": policy_options or {}, "workload": asdict(w),
            "hardware": hw.to_json(), "predictions": preds, "rows": rows(preds)}


def roofline(model: str, workloads: list[Workload], hw: HardwareProfile, policy_name: str = "full",
             policy_options: dict | None = None, run: bool = True, steps: int = 5,
             progress: Callable[[str], None] = lambda msg: None) -> list[dict]:
    """Predicted (and, with run, measured) rows for each workload. Workloads of one dtype and quantization share
    one engine; the engine is sized for the largest of them."""
    cfg = ModelConfig.from_hf(model)
    results = [analyse(cfg, w, hw, policy_name, policy_options) for w in workloads]
    if not run:
        return results
    groups: dict[tuple, list[int]] = {}
    for i, w in enumerate(workloads):
        groups.setdefault((w.dtype, w.quantization), []).append(i)
    for idx in groups.values():
        big = max((workloads[i] for i in idx), key=lambda w: (w.num_tokens, w.batch_size * (w.kv_len + w.prompt_len)))
        opts = llm_options(big, hw.threads, policy_name, policy_options)
        opts["max_num_batched_tokens"] = max(max(workloads[i].num_tokens for i in idx), 512)
        opts["max_model_len"] = max(max(workloads[i].prompt_len, workloads[i].kv_len) for i in idx) + 128
        opts["max_num_seqs"] = max(64, *(workloads[i].batch_size for i in idx))
        progress(f"loading {model} ({big.dtype}{'' if big.quantization == 'none' else ', ' + big.quantization})...")
        try:
            llm = open_llm(model, opts)
        except CannotRun as e:
            for i in idx:
                results[i]["not_measured"] = str(e)
            continue
        with llm:
            for i in idx:
                m: Measured = measure(llm, workloads[i], steps=steps, progress=progress)
                results[i]["rows"] = rows(results[i]["predictions"], m)
                results[i]["step_runs_s"] = m.step_runs
    return results


def to_json(results: list[dict]) -> list[dict]:
    """The results without the Prediction objects (rows carry the same numbers)."""
    return [{k: v for k, v in r.items() if k != "predictions"} for r in results]
