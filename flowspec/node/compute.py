"""The one worker thread where torch runs, so the event loop keeps draining sockets while a forward runs."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

__all__ = ["Compute"]

T = TypeVar("T")


class Compute:
    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flowspec-compute")

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """Run `fn(*args)` on the compute thread; every future is awaited here, none is left behind."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def timed(self, fn: Callable[..., T], *args: object) -> tuple[T, float, float]:
        """Like run, plus the (start, end) of the compute on the monotonic clock."""

        def job() -> tuple[T, float, float]:
            start = time.monotonic()
            out = fn(*args)
            return out, start, time.monotonic()

        return await self.run(job)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def aclose(self) -> None:
        """Cancel queued jobs and wait for the running one, so what it uses (a drafter) is free again."""
        await asyncio.to_thread(self._pool.shutdown, True, cancel_futures=True)
