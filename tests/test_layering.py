"""The layer rules of DESIGN §3: lower layers never import higher ones; only train/ imports deepspeed/accelerate;
only distributed/ imports torch.distributed; only kernels/ imports triton."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "offloadfr"

LEVEL = {
    "errors": 1, "config": 1, "registry": 1, "faults": 1,
    "models": 2, "losses": 2,
    "bank": 3, "kernels": 3, "data": 3,
    "distributed": 4,
    "cache": 5,
    "heads": 6,
    "eval": 7,
    "train": 8,
    "bench": 9,
    "cli": 10, "tools": 10,
}


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def _component(path: Path) -> str:
    rel = path.relative_to(PKG)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def test_every_module_has_a_layer() -> None:
    """Catches a new top-level module or package that the layering checks below would silently skip."""
    components = {_component(path) for path in PKG.rglob("*.py")} - {"__init__"}
    assert not sorted(components - set(LEVEL)), "add these to LEVEL (and to docs/architecture.md's layer table)"


def test_no_upward_imports() -> None:
    """Catches e.g. a bank module importing heads, or a model importing train (R1)."""
    problems = []
    for path in PKG.rglob("*.py"):
        comp = _component(path)
        if comp not in LEVEL:
            continue
        for name in _imports(path):
            parts = name.split(".")
            if parts[0] != "offloadfr" or len(parts) < 2:
                continue
            target = parts[1]
            if target in LEVEL and LEVEL[target] > LEVEL[comp]:
                problems.append(f"{path.relative_to(PKG)} (L{LEVEL[comp]}) imports {name} (L{LEVEL[target]})")
    assert not problems, "\n".join(problems)


def test_heavy_dependencies_stay_in_their_layer() -> None:
    """Catches deepspeed/accelerate imported outside train/, torch.distributed outside distributed/ (and train/), triton
    outside kernels/."""
    problems = []
    for path in PKG.rglob("*.py"):
        comp = _component(path)
        for name in _imports(path):
            root = name.split(".")[0]
            if root in ("deepspeed", "accelerate") and comp != "train":
                problems.append(f"{path.relative_to(PKG)} imports {name}")
            if name.startswith("torch.distributed") and comp not in ("distributed", "train"):
                problems.append(f"{path.relative_to(PKG)} imports {name}")
            if root == "triton" and comp != "kernels":  # an optional dependency, imported lazily by kernels/ only
                problems.append(f"{path.relative_to(PKG)} imports {name}")
    assert not problems, "\n".join(problems)
