"""Layering: no module of `freevlm` imports, directly or through others, a module that imports it back.

The import graph is read from the source (AST), not from `sys.modules`: every `import freevlm...` and
`from freevlm... import ...` statement counts, at module level and inside functions alike (a lazy import hides a
cycle from the interpreter, not from the design). `from package import name` is an edge to the submodule
`package.name` when there is one, and to the package's `__init__` otherwise. The implicit import of a module's
parent packages is not an edge (every module would otherwise depend on `freevlm/__init__.py`).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "freevlm"


def _modules(src: Path = SRC) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (a package is its `__init__.py`)."""
    modules = {}
    for path in sorted((src / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _resolve(target: str, modules: dict[str, Path]) -> str | None:
    """The module `target` names, or its closest enclosing module (`freevlm.a.b.func` -> `freevlm.a.b`)."""
    while target and target not in modules:
        target = target.rpartition(".")[0]
    return target or None


def _edges(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out.update(_resolve(alias.name, modules) for alias in node.names
                       if alias.name.split(".")[0] == PACKAGE)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's package (its own name, for an __init__)
                base = name.split(".")
                base = base[:len(base) - node.level + (1 if is_package else 0)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] != PACKAGE:
                continue
            for alias in node.names:  # `from pkg import sub` names the submodule, `from pkg import obj` the package
                out.add(_resolve(f"{source}.{alias.name}", modules))
    out.discard(None)
    out.discard(name)
    return out


def import_graph(src: Path = SRC) -> dict[str, set[str]]:
    modules = _modules(src)
    return {name: _edges(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as [a, b, ..., a], or None."""
    WHITE, GREY, BLACK = 0, 1, 2
    colour = dict.fromkeys(graph, WHITE)
    for root in sorted(graph):
        if colour[root] != WHITE:
            continue
        stack = [(root, iter(sorted(graph[root])))]
        colour[root] = GREY
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                colour[node] = BLACK
                stack.pop()
            elif colour.get(child, BLACK) == GREY:
                path = [n for n, _ in stack]
                return path[path.index(child):] + [child]
            elif colour.get(child) == WHITE:
                colour[child] = GREY
                stack.append((child, iter(sorted(graph[child]))))
    return None


def test_the_graph_is_read():
    graph = import_graph()
    assert "freevlm.generation.graphs" in graph["freevlm.generation.buffers"]  # imported inside a function
    assert "freevlm.backbones" in graph["freevlm.generation.api"]  # a name from the package's __init__
    assert "freevlm.reproduce.tables.plan" in graph["freevlm.reproduce.tables.fig4b"]  # `from package import module`
    assert "freevlm.planning.costs" in graph["freevlm.eval.planning"]


@pytest.mark.parametrize("module, forbidden", [
    ("freevlm.machine", "freevlm"),  # leaves: nothing from freevlm
    ("freevlm.generation.events", "freevlm"),
    ("freevlm.reproduce.seed", "freevlm.reproduce.tables"),  # the tables receive a SeedRun, not the reverse
    ("freevlm.reproduce.seed", "freevlm.reproduce.run"),
    ("freevlm.planning.gates", "freevlm.generation"),  # decoding loads gates (generation.api)
])
def test_leaf_modules_stay_leaves(module, forbidden):
    graph = import_graph()
    assert not [m for m in graph[module] if m == forbidden or m.startswith(forbidden + ".")]


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("source, cyclic", [
    ({"a.py": "from freevlm import b\n", "b.py": "def f():\n    from freevlm.a import x\n"}, True),
    ({"a.py": "import freevlm.b\n", "b.py": "from . import c\n", "c.py": "from .a import x\n"}, True),
    ({"a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from freevlm.b import B\n",
      "b.py": "from freevlm.a import A\n"}, True),
    ({"__init__.py": "from freevlm.a import x\n", "a.py": "from freevlm.b import y\n",
      "b.py": "from freevlm import z\n"}, True),
    ({"__init__.py": "from freevlm.a import x\n", "a.py": "from freevlm.b import y\n", "b.py": "import os\n"},
     False),
])
def test_a_cycle_is_found(tmp_path, source, cyclic):
    """The checker itself: a lazy import, a relative import, a typing-only import and an import of the package's
    `__init__` each close a cycle; a chain that ends outside the package does not."""
    (tmp_path / PACKAGE).mkdir()
    (tmp_path / PACKAGE / "__init__.py").write_text("")
    for name, text in source.items():
        (tmp_path / PACKAGE / name).write_text(text)
    assert (find_cycle(import_graph(tmp_path)) is not None) == cyclic
