"""net/ knows nothing about trees or models (docs/ARCHITECTURE.md, Layers)."""

from __future__ import annotations

import subprocess
import sys


def test_net_does_not_import_model_or_sched() -> None:
    code = ("import sys, flowspec.net, flowspec.net.bench; "
            "bad = [m for m in sys.modules if m.startswith(('flowspec.model', 'flowspec.sched', 'flowspec.node'))]; "
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
