"""No import cycles among ferry's modules, nor among bench's modules and packages.

A cycle hides which of two modules is the lower one: each can only be imported after the other is half
built, and a lazy import inside a function (the usual way to silence the error) keeps the knot without the
error. So every import counts here, top-level or inside a function, and a cycle is a failure with its path."""
from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: pathlib.Path, known: set[str]) -> set[str]:
    """The known modules this file imports, anywhere in it ('from a import b' is a.b when b is a module)."""
    out: set[str] = set()
    is_pkg = path.name == "__init__.py"
    here = module_name(path)
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against this module's package
                pkg = here.split(".") if is_pkg else here.split(".")[:-1]
                pkg = pkg[:len(pkg) - (node.level - 1)]
                base = ".".join(pkg + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.add(sub if sub in known else base)
    return {m for m in out if m in known}


def module_graph(*packages: str) -> dict[str, set[str]]:
    files = {module_name(p): p for pkg in packages for p in (ROOT / pkg).rglob("*.py")
             if ".cache" not in p.parts}
    known = set(files)
    return {name: imported_modules(path, known) - {name} for name, path in files.items()}


def unit_graph(graph: dict[str, set[str]], depth: int) -> dict[str, set[str]]:
    """The graph between packages (and top-level modules) `depth` levels down: bench.engines, bench.models..."""
    def unit(m: str) -> str:
        return ".".join(m.split(".")[:depth])
    out: dict[str, set[str]] = {}
    for a, targets in graph.items():
        out.setdefault(unit(a), set()).update(unit(b) for b in targets if unit(b) != unit(a))
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _explain(graph: dict[str, set[str]], comps: list[list[str]]) -> str:
    return "\n".join(" <-> ".join(c) + "\n    " + "; ".join(f"{a} -> {sorted(graph[a] & set(c))}" for a in c)
                     for c in comps)


def test_no_import_cycles_among_ferry_modules():
    graph = module_graph("ferry")
    found = cycles(graph)
    assert not found, "import cycles in ferry:\n" + _explain(graph, found)


def test_no_import_cycles_in_bench():
    graph = module_graph("bench", "ferry")
    found = cycles(graph)
    assert not found, "import cycles among bench's modules:\n" + _explain(graph, found)
    packages = unit_graph({m: t for m, t in graph.items() if m.startswith("bench")}, depth=2)
    found = cycles(packages)
    assert not found, "import cycles among bench's packages:\n" + _explain(packages, found)


def test_the_cycle_finder_finds_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles(unit_graph({"p.x.m": {"p.y.n"}, "p.y.n": {"p.x.k"}, "p.x.k": set()}, depth=2)) == [["p.x", "p.y"]]
