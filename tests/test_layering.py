"""The folder shows the architecture (docs/ARCHITECTURE.md, "Rooms"): each package imports only the rooms below
it, and emulation lives in flowspec/bench alone, behind the product's one seam (flowspec.node.backend)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "flowspec"

# room -> the flowspec rooms it may import (besides itself and the shared bottom: errors, compat, treemask, bounds)
ALLOWED: dict[str, set[str]] = {
    "sched": set(),
    "model": set(),
    "net": set(),
    "store": {"model"},
    "node": {"sched", "model", "store", "net", "config", "logging"},
    "api": {"node", "sched", "model", "store", "net", "config"},
    "serve": {"api", "node", "sched", "model", "store", "net", "config", "logging"},
    "cli": {"api", "node", "sched", "model", "store", "net", "config", "logging", "prompts", "bench", "serve"},
    "bench": {"api", "cli", "node", "sched", "model", "store", "net", "config", "logging", "prompts"},
}
BOTTOM = {"errors", "compat", "treemask", "text", "bounds"}
PRODUCT = ("sched", "model", "net", "node", "store")
EMULATION_WORDS = ("profile", "dilation", "pacer", "shaper", "charge_bytes", "emulat")


def _room(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0].removesuffix(".py")


def _imports(path: Path) -> list[str]:
    out: list[str] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append(node.module)
    return [m for m in out if m == "flowspec" or m.startswith("flowspec.")]


SOURCES = sorted(p for p in PACKAGE.rglob("*.py") if _room(p) in ALLOWED)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_each_room_imports_only_the_rooms_below_it(path: Path) -> None:
    room = _room(path)
    bad = []
    for module in _imports(path):
        parts = module.split(".")
        target = parts[1] if len(parts) > 1 else ""
        if target and target != room and target not in BOTTOM and target not in ALLOWED[room]:
            bad.append(module)
    assert not bad, f"{path.relative_to(ROOT)} ({room}/) imports {bad}; allowed: {sorted(ALLOWED[room] | BOTTOM)}"


def _identifiers(path: Path) -> set[str]:
    """Every name the code defines or uses (docstrings and comments may point at the testbed; code may not)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.keyword) and node.arg:
            names.add(node.arg)
    return names


@pytest.mark.parametrize("room", PRODUCT)
def test_the_product_knows_no_emulation(room: str) -> None:
    """No product module imports flowspec.bench or has a name for device profiles, dilation, pacing or shaping."""
    found = []
    for path in sorted((PACKAGE / room).rglob("*.py")):
        names = {n.lower() for n in _identifiers(path)}
        found += [f"{path.relative_to(ROOT)}: {n}" for n in sorted(names) if any(w in n for w in EMULATION_WORDS)]
        found += [f"{path.relative_to(ROOT)}: imports {m}" for m in _imports(path) if m.startswith("flowspec.bench")]
    assert not found, found


def test_the_table_covers_every_package() -> None:
    packages = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert packages <= set(ALLOWED), f"add {sorted(packages - set(ALLOWED))} to ALLOWED and to ARCHITECTURE.md"
