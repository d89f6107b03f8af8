"""Reading a node's structured log: the JSON lines structlog writes when stderr is a file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def json_events(path: Path) -> list[dict[str, Any]]:
    """Every JSON log line of a process's log file (non-JSON lines, e.g. a traceback, are skipped)."""
    out = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out
