"""Where a node's work runs: one compute thread for torch, and the network its links use.

This is the one seam between the product and an emulated testbed, in the spirit of httpcore's
``network_backend=``. The default ``Backend`` computes as fast as the machine can and writes frames at once.
``flowspec.bench.testbed`` passes a subclass whose ``charge`` holds each piece of work to a device profile's
cost and whose network shapes the links, so nodes carry no emulation parameters of their own.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar, final

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


# Which queued job the compute thread takes first: a stage forward or the lm_head over a returned segment (the
# pipeline waits on them) before drafting (which only prepares later segments). Jobs of one priority run in the
# order they came. A running job is never interrupted: drafting is split into one job per tree level instead.
_PRIORITY = {WorkKind.STAGE_FORWARD: 0, WorkKind.LM_HEAD: 0, WorkKind.DRAFT_SYNC: 1, WorkKind.DRAFT_LEVEL: 1}
_Job = tuple[int, int, Callable[[], Any] | None, "Future[Any] | None"]


class Backend:
    """A node's compute thread and network. Subclasses may override ``charge`` and ``network``."""

    network: Network = DIRECT

    def __init__(self) -> None:
        self._jobs: queue.PriorityQueue[_Job] = queue.PriorityQueue()
        self._order = itertools.count()
        self._thread: threading.Thread | None = None
        self._closed = False

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

        if self._closed:
            raise RuntimeError("the backend is closed")
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name="flowspec-compute", daemon=True)
            self._thread.start()
        done: Future[tuple[T, float, float]] = Future()
        self._jobs.put((_PRIORITY[work.kind], next(self._order), job, done))
        return await asyncio.wrap_future(done)

    def _serve(self) -> None:
        """The compute thread: the most urgent queued job next, one at a time, as on one device."""
        while True:
            _, _, job, done = self._jobs.get()
            if job is None or done is None:
                return
            if not done.set_running_or_notify_cancel():
                continue  # its caller was cancelled while it waited
            try:
                done.set_result(job())
            except BaseException as exc:
                done.set_exception(exc)
            # not held while waiting for the next job: the last one's arguments (a request's KV cache) are freed
            job = done = None

    def request_closed(self, req: int) -> None:
        """The node finished request ``req`` (a hook for per-request reports; nothing to do here)."""

    async def aclose(self) -> None:
        """Cancel queued jobs and wait for the running one, so what it uses (a drafter) is free again."""
        self._closed = True
        while True:
            try:
                _, _, _, done = self._jobs.get_nowait()
            except queue.Empty:
                break
            if done is not None:
                done.cancel()
        if self._thread is not None:
            self._jobs.put((-1, -1, None, None))  # ahead of anything: stop
            await asyncio.to_thread(self._thread.join)
