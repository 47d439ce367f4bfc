"""The package's import graph: no cycles, and a pure core that imports no I/O.

Every `import` in node/ counts, wherever it stands: at module level, inside a
function (a lazy import is still a dependency) and under `if TYPE_CHECKING:` (a
typing cycle is the same design knot, and becomes a runtime one the day someone
moves the import up). An edge to a module inside a package does not count as an
edge to the package's `__init__` (as in import-linter), so siblings may import
each other's modules without looping through the package.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "node"

# What the pure core may reach, transitively: no trio, no libp2p, no sockets, no CLI.
# A new pure module the core needs goes here; an I/O one means the design is off.
PURE = {
    "node.auction", "node.events", "node.codec", "node.schema", "node.errors", "node.keys",
    "node.reputation",
}
IO_LIBRARIES = {"trio", "libp2p", "multiaddr", "socket", "h11", "sqlite3", "subprocess"}


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = path
    return mods


def _imported_names(mod: str, path: Path) -> set[str]:
    """Every dotted name an import statement in `path` may refer to."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = mod.split(".")
                if path.name != "__init__.py":
                    base.pop()
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if node.module:
                names.add(target)
            # `from . import codec` imports the module node.codec (and `from . import
            # Processor` the package itself: the longest module prefix is taken).
            names.update(f"{target}.{a.name}" for a in node.names)
    return names


def _graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(edges between node modules, top-level external packages each imports)."""
    mods = _modules()
    edges: dict[str, set[str]] = {}
    external: dict[str, set[str]] = {}
    for mod, path in mods.items():
        deps, ext = set(), set()
        for name in _imported_names(mod, path):
            if name == "node" or name.startswith("node."):
                parts = name.split(".")
                while parts and ".".join(parts) not in mods:
                    parts.pop()  # `node.codec.pack` -> node.codec
                if parts and ".".join(parts) != mod:
                    deps.add(".".join(parts))
            else:
                ext.add(name.split(".")[0])
        edges[mod], external[mod] = deps, ext
    return edges, external


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(edges[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
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
    return found


def _closure(edges: dict[str, set[str]], roots: set[str]) -> set[str]:
    seen, todo = set(roots), list(roots)
    while todo:
        for dep in edges[todo.pop()]:
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def _in(mod: str, prefixes: set[str]) -> bool:
    return any(mod == p or mod.startswith(p + ".") for p in prefixes)


def test_the_checker_finds_cycles_and_hidden_imports(tmp_path: Path) -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    path = tmp_path / "svc.py"  # as node/dataplane/svc.py
    path.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                    "    from ..daemon import Node\ndef f():\n    from ..p2p import host\n")
    names = _imported_names("node.dataplane.svc", path)
    assert {"node.daemon", "node.daemon.Node", "node.p2p", "node.p2p.host"} <= names


def test_node_has_no_import_cycles() -> None:
    edges, _ = _graph()
    assert {"node.daemon", "node.context", "node.provider", "node.cli"} <= set(edges)
    cycles = _cycles(edges)
    if cycles:
        lines = [" <-> ".join(c) + ": " + "; ".join(
            f"{m} imports {', '.join(sorted(edges[m] & set(c)))}" for m in c) for c in cycles]
        pytest.fail("import cycles in node/:\n" + "\n".join(lines))


def test_services_depend_on_node_context_not_on_the_daemon() -> None:
    edges, _ = _graph()
    importers = sorted(m for m, deps in edges.items() if "node.daemon" in deps)
    assert importers == ["node.cli.node_cmds"], (
        f"only `bidmesh run` may import node.daemon; services take a NodeContext: {importers}")


@pytest.mark.parametrize("root", ["node.auction"])
def test_pure_core_imports_no_io(root: str) -> None:
    edges, external = _graph()
    reached = _closure(edges, {m for m in edges if _in(m, {root})})
    assert all(_in(m, PURE) for m in reached), (
        f"{root} reaches beyond the pure core: {sorted(m for m in reached if not _in(m, PURE))}")
    io = {m: sorted(external[m] & IO_LIBRARIES) for m in reached if external[m] & IO_LIBRARIES}
    assert not io, f"{root} reaches I/O libraries: {io}"
