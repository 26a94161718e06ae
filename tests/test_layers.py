"""The packages form layers: each imports only the layers below it, never a peer or one above.

    utilities   atomic, distributed, knn,      (no wakd imports)
                pretrained, resolvers
    storage     store, ann                     (descriptor store, search by config: on the utilities)
    foundations models, losses, data           (models know nothing of datasets, losses are
                                                pure functions of tensors, data knows no network)
    describe    descriptor extraction          (networks over images)
    eval        retrieval, Recall@N, reports
    modules     LightningModules, mining, validation
    entry       jobs, cli, export, report,     (may import anything; synth: the demo stack)
                synth

No module outside wakd.synth imports it, at any depth: the paper's code reaches the demo
stack only through config ``_target_``s (and the dataset's generator) the entry points resolve.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "wakd"

LAYERS: list[set[str]] = [
    {"atomic", "distributed", "knn", "pretrained", "resolvers"},
    {"store", "ann"},
    {"models", "losses", "data"},
    {"describe", "zoo"},
    {"eval"},
    {"modules"},
    {"jobs", "cli", "export", "report", "synth"},
]
LAYER_OF = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}
ENTRY = len(LAYERS) - 1


def _unit(module: str) -> str:
    """'wakd.data.tuple_miner' -> 'data': the top-level package or module inside wakd."""
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



@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(SRC)))
def test_paper_modules_never_import_the_demo_stack(path: Path) -> None:
    relative = path.relative_to(SRC)
    if relative.parts[0] == "synth":
        return
    demo = sorted(m for m in _wakd_imports(path) if _unit(m) == "synth")
    assert not demo, f"{relative} imports {demo}: route it through a config _target_ instead"


def test_the_demo_stack_check_sees_imports() -> None:
    # The walk must find the demo stack's own imports of itself, or the check above proves nothing.
    assert any(_unit(m) == "synth" for m in _wakd_imports(SRC / "synth" / "pretrain_module.py"))
