"""Hygiene enforced by CI: the whole package type-checks under the project's mypy config (python 3.10), the
sans-IO core, the network layer and the shell (node, serve, api) under --strict, and ruff's configured rules (pyflakes, pycodestyle, sorted
imports) hold everywhere."""

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


def _run(*cmd: str) -> None:
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_package_passes_mypy() -> None:
    _run(_tool("mypy"), "flowspec")


def test_the_core_and_its_shell_pass_mypy_strict() -> None:
    """sched, net, the mask, and the shell around them (node, serve, api) under --strict; the modules they
    import (model, store) are checked by the plain run above, not reported here."""
    _run(_tool("mypy"), "--strict", "--follow-imports=silent", "flowspec/sched", "flowspec/net",
         "flowspec/treemask.py", "flowspec/node", "flowspec/serve", "flowspec/api.py")


def test_ruff_with_the_configured_rules() -> None:
    _run(_tool("ruff"), "check", "--output-format", "concise", "flowspec", "tests", "scripts", "bin/flowspec-node")
