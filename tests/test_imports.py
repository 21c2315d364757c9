"""No import circle between files or between packages, and no import of zeroshot from vlpretrain.

The import graph is read from the source with `ast`, so an import hidden inside a function counts like one at the
top of a file (that is how circles used to hide). What counts as an edge from module A to module B:

- `import a.b.c` and `from a.b.c import name`: an edge to `a.b.c`; `from a.b import c` where `a/b/c.py` (or
  `a/b/c/`) exists: an edge to `a.b.c`, otherwise (a name defined in `a/b/__init__.py`) to `a.b`. Relative imports
  are resolved against A's package first. Only modules of vlpretrain and zeroshot are nodes.
- Parent packages that Python runs on the way (`a`, `a.b` for `import a.b.c`) are not edges. Otherwise every
  package's `__init__.py` that re-exports its children would form a circle with each child, a layout this code
  uses on purpose. A module that names its own package's `__init__` explicitly (`from zeroshot.datasets import
  get_benchmark` inside `zeroshot/datasets/x.py`) does get that edge, and a circle if the `__init__` imports it
  back: that one is real, the two modules need each other half-loaded.
- Imports under `if TYPE_CHECKING:` count too: a circle in the types is a circle in the design.
- Strings handed to `importlib` (`vlpretrain/__init__.py`'s lazy exports, entry points read from the installed
  metadata) are not imports: they are how a lower layer takes code from a higher one without depending on it.

Packages are compared one level down: each of `vlpretrain.engine`, `vlpretrain.models`, `vlpretrain.data`,
`zeroshot.datasets` ... and each top-level module (`vlpretrain.trainer`, `zeroshot.evaluate`) is one unit, and the
two packages' `__init__.py` units of their own; an edge between two modules is an edge between their units.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

from helpers import REPO

PACKAGES = ("vlpretrain", "zeroshot")


def module_files(root: Path = REPO) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the two packages."""
    out = {}
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _known(name: str, modules: dict[str, Path]) -> str | None:
    """`name` if it is one of ours, else its longest prefix that is (None when outside both packages)."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in modules:
            return ".".join(parts[:n])
    return None


def imports_of(module: str, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """(imported module of ours, line) for every import statement in `module`'s file, nested ones included."""
    path = modules[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for target in targets:
            known = _known(target, modules)
            if known is not None and known != module:
                out.append((known, node.lineno))
    return out


def import_graph(modules: dict[str, Path]) -> dict[str, dict[str, int]]:
    """module -> {imported module: line of its first import}."""
    graph: dict[str, dict[str, int]] = {m: {} for m in modules}
    for m in modules:
        for target, line in imports_of(m, modules):
            graph[m].setdefault(target, line)
    return graph


def unit(module: str) -> str:
    """The package-level unit of a module: its package and the next name (`vlpretrain.engine.core` ->
    `vlpretrain.engine`); a top-level `__init__` is its own unit."""
    return ".".join(module.split(".")[:2])


def unit_graph(graph: dict[str, dict[str, int]]) -> dict[str, dict[str, str]]:
    """unit -> {imported unit: one import that makes the edge, as "module -> module"}."""
    out: dict[str, dict[str, str]] = defaultdict(dict)
    for m, targets in sorted(graph.items()):
        out[unit(m)]
        for t in sorted(targets):
            if unit(t) != unit(m):
                out[unit(m)].setdefault(unit(t), f"{m} -> {t}")
    return dict(out)


def cycles(graph: dict[str, dict[str, object]]) -> list[list[str]]:
    """One circle through each strongly connected component of more than one node (Tarjan's algorithm), each
    as [a, b, ..., a]."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, {})):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_circle_in(sorted(c)[0], c, graph) for c in components]


def _circle_in(start: str, component: set[str], graph: dict[str, dict[str, object]]) -> list[str]:
    """The shortest path from `start` back to itself inside `component` (breadth first)."""
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(came_from[path[-1]])
                    return [start, *reversed(path[:-1]), start] if v != start else [start, start]
                if w in component and w not in came_from:
                    came_from[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no circle through {start}")


def _describe(circle: list[str], graph: dict[str, dict[str, object]], modules: dict[str, Path] | None) -> str:
    steps = []
    for a, b in zip(circle, circle[1:]):
        how = graph[a][b]
        where = f"{modules[a].relative_to(REPO)}:{how}" if modules is not None else str(how)
        steps.append(f"{a} -> {b} ({where})")
    return "\n    ".join(steps)


def test_no_import_circle_between_files():
    modules = module_files()
    graph = import_graph(modules)
    found = [_describe(c, graph, modules) for c in cycles(graph)]
    assert not found, "import circle(s) between files:\n  " + "\n  ".join(found)


def test_no_import_circle_between_packages():
    units = unit_graph(import_graph(module_files()))
    found = [_describe(c, units, None) for c in cycles(units)]
    assert not found, "import circle(s) between packages:\n  " + "\n  ".join(found)


def test_vlpretrain_never_imports_zeroshot():
    modules = module_files()
    found = [f"{modules[m].relative_to(REPO)}:{line} imports {t}"
             for m in sorted(modules) if m.startswith("vlpretrain")
             for t, line in imports_of(m, modules) if t.split(".")[0] == "zeroshot"]
    assert not found, "vlpretrain imports zeroshot (the CLI hands evaluators in instead):\n  " + "\n  ".join(found)


def test_the_graph_sees_imports_inside_functions(tmp_path):
    """The reader itself: nested and relative imports, and `from pkg import submodule`, make edges."""
    (tmp_path / "vlpretrain" / "sub").mkdir(parents=True)
    (tmp_path / "zeroshot").mkdir()
    (tmp_path / "vlpretrain" / "__init__.py").write_text("")
    (tmp_path / "vlpretrain" / "sub" / "__init__.py").write_text("from .a import f\n")
    (tmp_path / "vlpretrain" / "sub" / "a.py").write_text("def f():\n    from vlpretrain import b\n")
    (tmp_path / "vlpretrain" / "b.py").write_text("def g():\n    from .sub.a import f\n")
    (tmp_path / "zeroshot" / "__init__.py").write_text("import vlpretrain.b\n")
    modules = module_files(tmp_path)
    graph = {m: {t: line for t, line in imports_of(m, modules)} for m in modules}
    assert graph == {"vlpretrain": {}, "vlpretrain.b": {"vlpretrain.sub.a": 2},
                     "vlpretrain.sub": {"vlpretrain.sub.a": 1}, "vlpretrain.sub.a": {"vlpretrain.b": 2},
                     "zeroshot": {"vlpretrain.b": 1}}
    assert cycles(graph) == [["vlpretrain.b", "vlpretrain.sub.a", "vlpretrain.b"]]
    assert cycles(unit_graph(graph)) == [["vlpretrain.b", "vlpretrain.sub", "vlpretrain.b"]]
