"""The layout's rules, checked on the source: no import circles between edgekd's modules (lazy and
TYPE_CHECKING imports included), section models importable without the stages' code, no torch in the
runtime. `python tests/test_architecture.py` prints the module count, the import edges and the rooms."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "edgekd"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def import_graph() -> dict[str, set[str]]:
    """module -> edgekd modules it imports anywhere in its text (what each import statement loads)."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
            for target in targets:
                while target and target not in modules:  # `import edgekd.x.y` loads edgekd.x.y; a name in a module
                    target = target.rpartition(".")[0]
                if target and target != name and target.startswith("edgekd"):
                    graph[name].add(target)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for node in graph:
        if node not in index:
            visit(node)
    return found


def rooms(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """Top-level modules and folders of edgekd as rooms, and the import edges between different rooms."""
    def room(module: str) -> str:
        return ".".join(module.split(".")[:2])

    edges: dict[str, set[str]] = {}
    for source, targets in graph.items():
        edges.setdefault(room(source), set()).update(room(t) for t in targets if room(t) != room(source))
    return edges


def test_edgekd_has_no_import_circles() -> None:
    assert circles(import_graph()) == []


def test_section_models_import_no_stage_code() -> None:
    """config.py composes the sections; importing it must not pull in a stage's run code (or torch)."""
    graph = import_graph()
    reached, todo = set(), ["edgekd.config"]
    while todo:
        module = todo.pop()
        if module not in reached:
            reached.add(module)
            todo.extend(graph[module])
    stage_code = sorted(m for m in reached if m.startswith("edgekd.stages.") and not m.endswith(".config"))
    assert stage_code == []


def test_runtime_imports_only_runtime_modules() -> None:
    graph = import_graph()
    outside = {m: sorted(t for t in targets if not t.startswith("edgekd.runtime"))
               for m, targets in graph.items() if m.startswith("edgekd.runtime")}
    assert {m: t for m, t in outside.items() if t} == {}


if __name__ == "__main__":
    graph = import_graph()
    room_edges = rooms(graph)
    print(f"{len(graph)} modules, {sum(map(len, graph.values()))} import edges between them, "
          f"{len(circles(graph))} circles; {len(room_edges)} rooms (top-level modules and folders), "
          f"{sum(map(len, room_edges.values()))} edges between rooms")
