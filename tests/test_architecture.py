"""The package's structure: the import graph (every import statement, function-level ones included) has no
cycle, and the layers import only downwards (decompose/ is numpy only; passes/ know no planner, pipeline or
CLI; planning/ knows no pass; nothing imports the CLI; only zoo.py imports torch)."""
from __future__ import annotations

import ast
from pathlib import Path

import onnxcompress

PKG = Path(onnxcompress.__file__).resolve().parent


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PKG.rglob("*.py")}


def _imports(path: Path, name: str, modules: set[str]) -> set[str]:
    """Package modules imported anywhere in the file (module level, functions, methods)."""
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("onnxcompress"):
                    out.add(a.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[:len(base) - node.level + 1]
                mod = ".".join(anchor + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not mod.startswith("onnxcompress"):
                continue
            for a in node.names:
                sub = f"{mod}.{a.name}"
                out.add(sub if sub in modules else mod)
    return {m for m in out if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    return {n: _imports(p, n, set(mods)) for n, p in mods.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_cycle_detector_finds_a_planted_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    cyc = _cycles(import_graph())
    assert not cyc, f"import cycles: {cyc}"


def _offenders(graph, source_prefix: str, forbidden: tuple[str, ...]) -> list[tuple[str, str]]:
    return [(m, d) for m, deps in graph.items() if m.startswith(source_prefix)
            for d in deps if d.startswith(forbidden)]


def test_layers_import_only_downwards():
    g = import_graph()
    P = "onnxcompress."
    upper = (P + "pipeline", P + "cli", P + "analysis", P + "inspect", P + "validate")
    assert not _offenders(g, P + "decompose", tuple(P + x for x in ("ir", "ort", "passes", "planning", "data",
                                                                     "report", "analysis", "cli", "pipeline")))
    assert not _offenders(g, P + "ir", tuple(P + x for x in ("ort", "passes", "planning", "data", "analysis")) + upper)
    assert not _offenders(g, P + "ort", (P + "passes", P + "planning", P + "analysis") + upper)
    assert not _offenders(g, P + "passes", (P + "planning",) + upper)
    assert not _offenders(g, P + "planning", (P + "passes",) + upper)
    assert not [(m, d) for m, deps in g.items() for d in deps
                if d.startswith(P + "cli") and not m.startswith(P + "cli")]


def test_only_zoo_imports_torch_and_decompose_never_imports_onnx():
    for name, path in _modules().items():
        tree = ast.parse(path.read_text())
        mods = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names} | \
               {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and not n.level}
        if name != "onnxcompress.zoo":
            assert not mods & {"torch", "torchvision"}, name
        if name.startswith("onnxcompress.decompose"):
            assert not mods & {"onnx", "onnxruntime", "onnx_graphsurgeon"}, name


def test_no_function_over_80_lines_without_a_reason():
    """Long functions are listed here with their reason; any other function over 80 lines fails."""
    allowed: dict[str, str] = {}
    long = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body = node.body[1:] if ast.get_docstring(node) else node.body   # the docstring is not code
                n = node.end_lineno - body[0].lineno + 1 if body else 0
                key = f"{name}.{node.name}"
                if n > 80 and key not in allowed:
                    long.append((key, n))
    assert not long, long
