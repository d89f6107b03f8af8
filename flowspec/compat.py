"""asyncio features that arrived in 3.11, backed by backports on 3.10 (JetPack 6 ships 3.10)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable

if sys.version_info >= (3, 11):
    from asyncio import TaskGroup, timeout
    from builtins import BaseExceptionGroup
else:  # pragma: no cover - exercised on 3.10 only
    from async_timeout import timeout
    from exceptiongroup import BaseExceptionGroup
    from taskgroup import TaskGroup

__all__ = ["TIMEOUT_ERRORS", "BaseExceptionGroup", "TaskGroup", "add_note", "shielded", "timeout"]

# What an expired `timeout()` raises: the builtin TimeoutError on 3.11+, asyncio.TimeoutError on 3.10
# (async_timeout), where it is another class. Catch this tuple, never TimeoutError alone.
TIMEOUT_ERRORS: tuple[type[Exception], ...] = (TimeoutError, asyncio.TimeoutError)


def add_note(exc: BaseException, note: str) -> None:
    """`exc.add_note(note)` (3.11); on 3.10 the same `__notes__` list, which exceptiongroup's tracebacks show."""
    vars(exc).setdefault("__notes__", []).append(note)


async def shielded(cleanup: Awaitable[None]) -> None:
    """Run `cleanup` to its end even if this task is cancelled meanwhile (once or many times); then re-raise
    that cancellation. The one way flowspec waits out a cleanup: `suppress(CancelledError)` around an await
    would swallow a cancel meant for the caller, and a bare `shield` would leave the cleanup running alone."""
    task = asyncio.ensure_future(cleanup)
    cancelled = False
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    task.result()
