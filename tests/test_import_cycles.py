"""No import circles among wakd's modules, counting every import statement: function-level
ones and those under ``if TYPE_CHECKING`` too (a type-only circle still ties two modules
together)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in (SRC / "wakd").rglob("*.py")}


def _imports(module: str) -> set[str]:
    """The wakd modules ``module`` imports: ``from a.b import c`` counts as a.b.c when that is
    a module, else as a.b (the package's __init__). wakd imports absolutely only."""
    path = MODULES[module]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: a relative import; write it as wakd.<...>"
            for alias in node.names:
                name = f"{node.module}.{alias.name}"
                found.add(name if name in MODULES else node.module)
    return {name for name in found if name in MODULES and name != module}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of ``graph`` as a path that returns to its start, or None."""
    done: set[str] = set()
    for start in sorted(graph):
        path: list[str] = []
        on_path: set[str] = set()
        stack = [(start, iter(sorted(graph[start])))] if start not in done else []
        if stack:
            path, on_path = [start], {start}
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                stack.pop()
                path.pop()
                on_path.discard(node)
                done.add(node)
            elif child in on_path:
                return [*path[path.index(child) :], child]
            elif child not in done:
                stack.append((child, iter(sorted(graph[child]))))
                path.append(child)
                on_path.add(child)
    return None


def test_finder_reports_a_circle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_wakd_imports_have_no_circle() -> None:
    graph = {module: _imports(module) for module in MODULES}
    assert sum(map(len, graph.values())) > 50, "the walk found too few imports to be looking"
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)
