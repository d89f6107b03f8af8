"""Hygiene enforced by CI: the sans-IO core and the network layer type-check strictly; no undefined names."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tool(name: str) -> str:
    path = Path(sys.executable).parent / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: `pip install -e .[test]` installs it")
    return found


def test_sched_and_net_pass_mypy_strict() -> None:
    out = subprocess.run([_tool("mypy"), "--strict", "flowspec/sched", "flowspec/net"], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_no_undefined_names_or_unused_imports() -> None:
    out = subprocess.run([_tool("ruff"), "check", "--select", "F", "--output-format", "concise", "flowspec",
                          "tests", "bin/flowspec-node"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
