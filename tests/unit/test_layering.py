"""Imports go downward only (config -> request -> plan -> {models, kvcache, ...} -> {scheduler, runner} ->
engine -> server -> cli), the scheduler side stays free of torch, and the KV policies' two halves meet only in the
plan: the tensor side (ferry/runner/kv/) never imports the scheduler side (ferry/kvcache/)."""
from __future__ import annotations

import ast
import pathlib
import re

PKG = pathlib.Path(__file__).resolve().parents[2] / "ferry"
RANK = {
    "errors": 0, "config": 1, "request": 2, "plan": 3,
    "ops": 4, "models": 5, "quant": 5, "experts": 5, "kvcache": 4, "sampling": 4, "tokenizer": 4, "detokenizer": 4, "tiers": 4,
    "speculative": 5, "scheduler": 6, "runner": 6, "engine": 7, "default_model": 7, "cluster": 8, "server": 8, "eval": 8, "roofline": 8, "cli": 9, "__main__": 10, "__init__": 10,
}
TORCH_FREE = ("scheduler", "speculative", "request", "plan", "config", "errors", "kvcache", "engine/inputs.py", "engine/view.py")
TENSOR_KV = "runner/kv"  # the KV policies' tensor halves
# The engine's edge: what the server may import from ferry.engine (it talks to AsyncLLM and its input processor)
SERVER_SEES = {"ferry.engine.async_engine", "ferry.engine.inputs", "ferry.engine.stats", "ferry.engine.options"}
# Code outside the engine reads it through LLMEngine.view() / LLM.view(), never its parts
OUTSIDE = ("ferry/eval", "ferry/server", "bench", "tests/engine", "tests/e2e")
INTERNALS = re.compile(r"\b(engine|eng)\.(parts|kv|scheduler|runner|output)\b|\.output\.(groups|child_group)\b")


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


def test_server_sees_only_the_engines_edge():
    bad = [f"{p.relative_to(PKG)} imports {m}" for p in (PKG / "server").rglob("*.py") for m in _imports(p)
           if m.startswith("ferry.engine") and m not in SERVER_SEES]
    assert not bad, "the server reaches past the engine's edge:\n" + "\n".join(bad)


def test_nothing_outside_the_engine_reaches_into_it():
    root = PKG.parent
    bad = []
    for folder in OUTSIDE:
        for path in (root / folder).rglob("*.py"):
            rel = str(path.relative_to(root))
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if INTERNALS.search(line):
                    bad.append(f"{rel}:{n}: {line.strip()}")
    assert not bad, "engine internals used outside the engine (use engine.view()):\n" + "\n".join(bad)


def test_ops_is_a_leaf_and_only_ops_cpu_reads_the_isa():
    """Kernels import nothing else of ferry (every layer may use them); the CPU's level is decided in one module."""
    bad = []
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG)
        if rel.parts[0] == "ops":
            bad += [f"{rel} imports {m}" for m in _imports(path)
                    if m.startswith("ferry.") and not m.startswith("ferry.ops")]
        text = path.read_text()
        if rel != pathlib.Path("ops/cpu.py") and ('FERRY_ISA"' in text or "/proc/cpuinfo" in text):
            bad.append(f"{rel} reads FERRY_ISA or /proc/cpuinfo (ferry.ops.cpu owns the CPU's level)")
    assert not bad, "\n".join(bad)


def _from_imports(path: pathlib.Path) -> list[tuple[str, str]]:
    """(module, name) of every `from ferry... import name` in path."""
    return [(node.module, a.name) for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ferry.")
            for a in node.names]


def test_models_never_import_experts_nor_reach_into_private_names():
    """The model sees experts only through its ExpertWeights and routing ports (ferry.models.layers.mlp,
    ferry.models.routing); other packages use the public names of models and experts only (the loader's
    public functions, not its helpers)."""
    bad = []
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG)
        for mod, name in _from_imports(path):
            if _unit(rel) == "models" and mod.startswith("ferry.experts"):
                bad.append(f"{rel} imports {mod}")
            there = mod.split(".")[1]
            if name.startswith("_") and there in ("models", "experts") and there != _unit(rel):
                bad.append(f"{rel} imports {mod}.{name}")
    assert not bad, "\n".join(bad)


def test_routing_is_observed_through_the_port_only():
    """No forward hooks, and no MoE.route patched: observers register with the model's RoutingObservers."""
    bad = [str(p.relative_to(PKG)) for p in PKG.rglob("*.py")
           if "register_forward_hook" in p.read_text() or ".route = " in p.read_text()]
    assert not bad, f"routing observed around the port in {bad}"


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
