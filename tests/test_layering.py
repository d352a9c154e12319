"""The import graph of the five packages, read with `ast` (imports inside functions count too): layers that
point one way and no import cycles.

    kernels  <-  ssm_core (only through ssm_core/ops.py)  <-  genomics, audio, timeseries
"""
from __future__ import annotations

import ast
from pathlib import Path

from .helpers import REPO

# Each package may import only packages of a lower layer (and itself).
LAYERS = {"kernels": 0, "ssm_core": 1, "genomics": 2, "audio": 2, "timeseries": 2}


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in LAYERS for p in sorted((REPO / pkg).rglob("*.py"))}


def _imported(node: ast.AST, module: str, is_package: bool, known: set[str]) -> list[str]:
    """The modules of ours that one import statement of `module` names."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
        if node.level:
            base = module.split(".")
            base = base[:len(base) - node.level + (1 if is_package else 0)]
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module
        # `from pkg import name`: the submodule pkg.name where there is one, else pkg itself.
        names = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in known else prefix for a in node.names]
    else:
        return []
    found = []
    for name in names:
        while name and name not in known:   # `import a.b.c` of a non-module attribute path: its module
            name = name.rpartition(".")[0]
        if name:
            found.append(name)
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the modules of the five packages it imports (itself excluded)."""
    modules = _modules()
    known = set(modules)
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_package = path.name == "__init__.py"
        graph[name] = {m for node in ast.walk(tree) for m in _imported(node, name, is_package, known)} - {name}
    return graph


def _package(module: str) -> str:
    return module.split(".")[0]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan), each sorted: every import cycle
    lies in one."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
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
    return sorted(found)


def test_the_graph_sees_the_imports_it_must():
    # Guards the parser: relative, `from . import x`, function-level and absolute imports all resolve.
    g = import_graph()
    assert "ssm_core.ops" in g["ssm_core.mamba"] and "ssm_core.cpu" in g["ssm_core.mamba"]   # from .ops / from . import
    assert "kernels" in g["ssm_core.ops"]                                   # `import kernels` inside a function
    assert "kernels.scan" in g["kernels.mamba_inner"]                       # from .scan import ...
    assert "ssm_core.reference" in g["ssm_core"]                            # the package's __init__
    assert any(_package(m) == "ssm_core" for m in g["genomics.pretrain"])   # absolute, across packages


def test_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_kernels_import_nothing_from_the_other_packages():
    bad = {m: sorted(d for d in deps if _package(d) != "kernels")
           for m, deps in import_graph().items() if _package(m) == "kernels"}
    assert not {m: d for m, d in bad.items() if d}, "kernels must not import ssm_core or the task packages"


def test_ssm_core_reaches_kernels_only_through_ops():
    reach = sorted(m for m, deps in import_graph().items()
                   if _package(m) == "ssm_core" and any(_package(d) == "kernels" for d in deps))
    assert reach == ["ssm_core.ops"]


def test_packages_import_only_lower_layers():
    bad = sorted((m, d) for m, deps in import_graph().items() for d in deps
                 if _package(d) != _package(m) and LAYERS[_package(d)] >= LAYERS[_package(m)])
    assert not bad, f"imports against the layering {LAYERS}: {bad}"


def test_no_package_import_cycles():
    graph: dict[str, set[str]] = {}
    for m, deps in import_graph().items():
        graph.setdefault(_package(m), set()).update(_package(d) for d in deps if _package(d) != _package(m))
    assert cycles(graph) == []


def test_no_module_import_cycles():
    found = cycles(import_graph())
    assert not found, "modules that import each other (directly or through others): " + "; ".join(
        " <-> ".join(c) for c in found)
