"""Where a node's work runs: one compute thread for torch, and the network its links use.

This is the one seam between the product and an emulated testbed, in the spirit of httpcore's
``network_backend=``. The default ``Backend`` computes as fast as the machine can and writes frames at once.
``flowspec.bench.testbed`` passes a subclass whose ``charge`` holds each piece of work to a device profile's
cost and whose network shapes the links, so nodes carry no emulation parameters of their own.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar, final

from flowspec.net import DIRECT, Network

__all__ = ["Backend", "Work", "WorkKind"]

T = TypeVar("T")


class WorkKind(enum.Enum):
    STAGE_FORWARD = "stage"  # a stage's layers over `rows` new tokens with `context` tokens cached
    LM_HEAD = "lm_head"  # the head's output projection over `rows` returned rows
    DRAFT_SYNC = "draft_sync"  # the drafter takes the newly committed context (tree bookkeeping)
    DRAFT_LEVEL = "draft"  # one drafter forward over `rows` tree nodes, plus `context` pending context rows


@final
@dataclass(frozen=True, slots=True)
class Work:
    """What a compute job is, for a backend that cares about its cost."""

    kind: WorkKind
    rows: int
    context: int = 0


class Backend:
    """A node's compute thread and network. Subclasses may override ``charge`` and ``network``."""

    network: Network = DIRECT

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flowspec-compute")

    def charge(self, work: Work, start: float, end: float) -> float:
        """Called on the compute thread after ``work`` ran over [start, end) of the monotonic clock; returns when
        the work ends on this device. The real device is the machine itself: at once."""
        return end

    async def run(self, work: Work, fn: Callable[..., T], *args: object) -> tuple[T, float, float]:
        """Run ``fn(*args)`` on the compute thread; return its result and its (start, end) on the monotonic
        clock. Jobs run one at a time, in submission order, as on one device; every future is awaited here."""

        def job() -> tuple[T, float, float]:
            start = time.monotonic()
            out = fn(*args)
            return out, start, self.charge(work, start, time.monotonic())

        return await asyncio.get_running_loop().run_in_executor(self._pool, job)

    def request_closed(self, req: int) -> None:
        """The node finished request ``req`` (a hook for per-request reports; nothing to do here)."""

    async def aclose(self) -> None:
        """Cancel queued jobs and wait for the running one, so what it uses (a drafter) is free again."""
        await asyncio.to_thread(self._pool.shutdown, True, cancel_futures=True)
