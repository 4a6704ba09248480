"""The package layout: a root that holds the commands, packages whose imports point one way.

Layers, lowest first: ``common`` < ``kernels`` and ``data`` < ``pipeline`` < ``models`` < ``training`` <
``inference`` < the root's commands, ``bench`` and ``experiments``. A product module may import from its own
layer or below, never from above. No product module is longer than 600 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYER = {"common": 0, "kernels": 1, "data": 1, "pipeline": 2, "models": 3, "training": 4, "inference": 5}
TOP = 6  # root commands, bench/, experiments/


def _layer_of(parts: tuple[str, ...]) -> int:
    return LAYER.get(parts[0], TOP) if len(parts) > 1 else TOP


def _product_modules() -> list[Path]:
    skip = {"tests", ".venv", "docs", "build"}
    return [p for p in ROOT.rglob("*.py") if not set(p.relative_to(ROOT).parts) & skip]


def _dli_imports(path: Path) -> list[tuple[str, ...]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "dli":
            found.append(tuple(node.module.split(".")[1:]) or ("__init__",))
        elif isinstance(node, ast.Import):
            found += [tuple(a.name.split(".")[1:]) for a in node.names if a.name.split(".")[0] == "dli"]
    return [f for f in found if f]


def test_root_holds_at_most_ten_modules() -> None:
    modules = [p.name for p in ROOT.glob("*.py") if p.name not in {"__init__.py", "__main__.py"}]
    assert len(modules) <= 10, sorted(modules)


MAX_MODULE_LINES = 600


def test_no_product_module_is_over_600_lines() -> None:
    lengths = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in _product_modules()}
    assert lengths, "no product module found"
    long = {name: n for name, n in lengths.items() if n > MAX_MODULE_LINES}
    assert not long, long


def test_no_import_points_up() -> None:
    upward = []
    for path in _product_modules():
        own = _layer_of(path.relative_to(ROOT).with_suffix("").parts)
        for target in _dli_imports(path):
            if target[0] in LAYER and LAYER[target[0]] > own:
                upward.append(f"{path.relative_to(ROOT)} -> dli.{'.'.join(target)}")
    assert not upward, upward


def test_pyproject_lists_every_package() -> None:
    text = (ROOT / "pyproject.toml").read_text()
    for init in ROOT.rglob("__init__.py"):
        rel = init.parent.relative_to(ROOT)
        if rel.parts and rel.parts[0] not in {"tests", ".venv", "build"}:
            assert '"dli.' + ".".join(rel.parts) + '"' in text, rel
