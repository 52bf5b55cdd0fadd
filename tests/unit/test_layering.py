"""Imports go downward only (config -> request -> plan -> {models, kvcache, ...} -> {scheduler, runner} ->
engine -> server -> cli), the scheduler side stays free of torch, and the KV policies' two halves meet only in the
plan: the tensor side (ferry/runner/kv/) never imports the scheduler side (ferry/kvcache/)."""
from __future__ import annotations

import ast
import pathlib

PKG = pathlib.Path(__file__).resolve().parents[2] / "ferry"
RANK = {
    "errors": 0, "config": 1, "request": 2, "plan": 3,
    "ops": 4, "models": 5, "experts": 5, "kvcache": 4, "sampling": 4, "tokenizer": 4, "detokenizer": 4, "tiers": 4,
    "scheduler": 6, "runner": 6, "engine": 7, "default_model": 7, "server": 8, "eval": 8, "cli": 9, "__main__": 10, "__init__": 10,
}
TORCH_FREE = ("scheduler", "request", "plan", "config", "errors", "kvcache")
TENSOR_KV = "runner/kv"  # the KV policies' tensor halves


def _imports(path: pathlib.Path) -> list[str]:
    mods = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            mods += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            mods.append(node.module)
    return mods


def _unit(rel: pathlib.Path) -> str:
    return rel.parts[0].removesuffix(".py")


def test_imports_point_downward():
    bad = []
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG)
        here = _unit(rel)
        for mod in _imports(path):
            if not mod.startswith("ferry."):
                continue
            there = mod.split(".")[1]
            if there != here and RANK.get(there, 0) > RANK.get(here, 0):
                bad.append(f"{rel} imports {mod}")
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_scheduler_side_has_no_torch():
    bad = []
    for path in PKG.rglob("*.py"):
        rel = str(path.relative_to(PKG))
        if rel.startswith(TORCH_FREE) and any(m == "torch" or m.startswith("torch.") for m in _imports(path)):
            bad.append(rel)
    assert not bad, f"torch imported in {bad}"


def test_kv_tensor_side_never_imports_the_scheduler_side():
    """Every KV decision of a step travels in the plan (ferry/plan.py KVStep), not through calls into policies."""
    bad = []
    for path in (PKG / TENSOR_KV).rglob("*.py"):
        bad += [f"{path.relative_to(PKG)} imports {m}" for m in _imports(path)
                if m == "ferry.kvcache" or m.startswith("ferry.kvcache.")]
    assert not bad, "\n".join(bad)
    assert (PKG / TENSOR_KV / "storage.py").exists() and not (PKG / "models" / "kv").exists()


def test_the_decoder_carries_no_kv_policy_control_flow():
    """A policy that changes the rows between layers drives them itself (ferry/runner/kv/lazy.py)."""
    text = (PKG / "models" / "decoder.py").read_text()
    assert not any(word in text for word in ("changes_rows", "next_rows", "RowChange", "peek"))
