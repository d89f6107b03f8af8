"""asyncio features that arrived in 3.11, backed by backports on 3.10 (JetPack 6 ships 3.10)."""

from __future__ import annotations

import sys

if sys.version_info >= (3, 11):
    from asyncio import TaskGroup, timeout
else:  # pragma: no cover - exercised on 3.10 only
    from async_timeout import timeout
    from taskgroup import TaskGroup

__all__ = ["TaskGroup", "timeout"]
