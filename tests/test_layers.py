"""The packages form layers: each imports only the layers below it, never a peer or one above.

    utilities   atomic, distributed, knn,      (no wakd imports)
                pretrained
    storage     store, ann                     (descriptor store, search by config: on the utilities)
    foundations models, losses, data           (models know nothing of datasets, losses are
                                                pure functions of tensors, data knows no network)
    describe    descriptor extraction          (networks over images)
    eval        retrieval, Recall@N, reports
    modules     LightningModules, mining, validation
    entry       jobs, cli, export, demo        (may import anything)
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "wakd"

LAYERS: list[set[str]] = [
    {"atomic", "distributed", "knn", "pretrained"},
    {"store", "ann"},
    {"models", "losses", "data"},
    {"describe"},
    {"eval"},
    {"modules"},
    {"jobs", "cli", "export", "demo"},
]
LAYER_OF = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}
ENTRY = len(LAYERS) - 1


def _unit(module: str) -> str:
    """'wakd.data.mining' -> 'data': the top-level package or module inside wakd."""
    return module.split(".")[1]


def _wakd_imports(path: Path) -> set[str]:
    """Every wakd module ``path`` imports, at any depth (function-level imports too)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("wakd."))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("wakd."):
            found.add(node.module)
    return found


SOURCES = sorted(p for p in SRC.rglob("*.py") if p.name != "__init__.py" or p.parent != SRC)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(SRC)))
def test_imports_point_down_the_layers(path: Path) -> None:
    relative = path.relative_to(SRC)
    unit = relative.parts[0].removesuffix(".py")
    assert unit in LAYER_OF, f"wakd.{unit} has no layer: place it in tests/test_layers.py LAYERS"
    rank = LAYER_OF[unit]
    for module in _wakd_imports(path):
        target = _unit(module)
        assert target in LAYER_OF, f"{relative} imports {module}, which has no layer"
        allowed = target == unit or LAYER_OF[target] < rank or rank == ENTRY
        assert allowed, f"{relative} (layer {sorted(LAYERS[rank])}) imports {module} (layer {sorted(LAYERS[LAYER_OF[target]])})"

