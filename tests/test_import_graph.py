"""No import circles: an AST scan of every module under ``diffaccel/``, ``kernels/`` and ``pipelines/``
(mapped to ``diffaccel.kernels`` / ``diffaccel.pipelines``), function-local and relative imports
included. An import of a package counts as its ``__init__``; ``from pkg import name`` counts as the
submodule ``pkg.name`` when there is one. PEP 562 ``__getattr__`` lookups are not imports."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"diffaccel": ROOT / "diffaccel", "diffaccel.kernels": ROOT / "kernels", "diffaccel.pipelines": ROOT / "pipelines"}


def _modules() -> dict[str, tuple[Path, bool]]:
    """Module name -> (file, is a package's ``__init__``)."""
    modules: dict[str, tuple[Path, bool]] = {}
    for prefix, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            package = parts[-1] == "__init__"
            if package:
                parts.pop()
            modules[".".join([prefix, *parts])] = (path, package)
    return modules


def _imports(name: str, path: Path, package: bool, known: set[str]) -> set[str]:
    """The modules of ``known`` that ``name`` (at ``path``) imports anywhere in its body."""
    base = name if package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base.rsplit(".", node.level - 1)[0] if node.level > 1 else base
                module = f"{anchor}.{node.module}" if node.module else anchor
            else:
                module = node.module or ""
            targets = [f"{module}.{alias.name}" if f"{module}.{alias.name}" in known else module for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import a.b.c` of a non-module attribute: its module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(components)


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, path, package, known) for name, (path, package) in modules.items()}


def test_the_scan_sees_relative_local_and_submodule_imports():
    graph = _graph()
    assert "diffaccel.cli.checks" in graph["diffaccel.cli.image"]  # `from .checks import ...`
    assert "diffaccel.cli.models" in graph["diffaccel.cli.image"]  # `from . import models`: the submodule
    assert "diffaccel.features.key_steps" in graph["diffaccel.cli.image"]  # function-local
    assert "diffaccel.errors" in graph["diffaccel.cli"]  # the package's __init__, function-local
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circles():
    cycles = _cycles(_graph())
    assert not cycles, "import circles:\n" + "\n".join(" <-> ".join(cycle) for cycle in cycles)
