"""The head's links to every stage: connecting, routing each inbound frame to its request, and recovery.

One reader task per link, all owned by one TaskGroup that a supervisor task runs from `connect()` to
`aclose()`. A reader turns what arrives into items of the request's inbox: ring frames as they are, a stage's
`error` frame as `StageError` (or `StageLost` when the stage could not pass results on), and the loss of the
link itself as `StageLost` for every open request. Decisions about those stay with the request's driver.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import structlog

from flowspec.compat import TaskGroup
from flowspec.config import RECOVERY_TIMEOUT_S
from flowspec.errors import FlowSpecError, LocalProtocolError, StageFailed, StageTimeout
from flowspec.net import (
    DIRECT,
    Error,
    Hello,
    Limits,
    Link,
    Message,
    Network,
    Stats,
    Timeouts,
    TlsConfig,
    connect,
    connect_retrying,
)
from flowspec.sched import Event, StageError, StageLost

__all__ = ["DraftFailed", "Inbox", "LinkLost", "StageLinks"]

log = structlog.get_logger("flowspec.head")


class LinkLost(Exception):
    """Internal: the link to stage `stage` is gone; the request may resume once it (or a standby) is back."""

    def __init__(self, stage: int, reason: str) -> None:
        super().__init__(f"stage {stage}: {reason}")
        self.stage, self.reason = stage, reason


@dataclass(frozen=True, slots=True)
class DraftFailed:
    """A draft job of the request raised (a drafter bug): the request fails rather than wait for it."""

    error: BaseException


@dataclass
class Inbox:
    """What arrives for one request: ring frames and events, plus each stage's busy intervals at close."""

    items: asyncio.Queue[Message | Event | DraftFailed] = field(default_factory=asyncio.Queue)
    stats: dict[int, list[tuple[float, float, int]]] = field(default_factory=dict)
    memory: dict[int, dict[str, int]] = field(default_factory=dict)  # stage -> weights / kv / rss bytes
    stats_done: asyncio.Event = field(default_factory=asyncio.Event)
    bytes_sent: int = 0  # what the head put on the wire for this request (heartbeats are nobody's)


class StageLinks:
    """Links from the head to stages 1..N, in pipeline order, with their standbys and a recovery deadline."""

    def __init__(self, stages: Sequence[tuple[str, int]], hello: Hello, limits: Limits, timeouts: Timeouts,
                 secret: bytes | None, *, standbys: dict[int, list[tuple[str, int]]] | None = None,
                 recovery_timeout: float = RECOVERY_TIMEOUT_S, network: Network = DIRECT,
                 tls: TlsConfig | None = None, on_waiting: Callable[[int, str, float], None] | None = None) -> None:
        self.addresses = list(stages)
        self.hello, self.limits, self.timeouts, self.secret = hello, limits, timeouts, secret
        self.standbys = standbys or {}  # stage -> standby addresses serving the same layers
        self.recovery_timeout = recovery_timeout  # 0 = fail at once when a stage is lost
        self.network = network
        self.tls = tls  # mutual TLS on every link, or None for plain TCP
        self.links: list[Link] = []
        self._inboxes: dict[int, Inbox] = {}
        self._readers: dict[int, asyncio.Task[None]] = {}
        self._group: TaskGroup | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._waited: dict[int, float] = {}  # stage -> seconds waited for it so far, while waiting
        # told (stage, address, seconds waited) while a stage is unreachable: `flowspec run` shows a status line
        self.on_waiting = on_waiting
        # Ids unique across heads: a stage drops late frames of a finished request by id, so a new head must
        # not reuse an id another head (or an earlier attempt) used on the same stages.
        self._next_req = secrets.randbits(62)
        self.generation = 0  # recoveries done: a try begun before the latest one found the links replaced
        self._recovering = asyncio.Lock()  # one recovery at a time, however many requests lost the stage

    @property
    def num_stages(self) -> int:
        return len(self.addresses)

    @property
    def bytes_sent(self) -> int:
        return sum(link.bytes_sent for link in self.links)

    @property
    def open_requests(self) -> int:
        """Requests whose frames are routed here now (a finished request has none left)."""
        return len(self._inboxes)

    @property
    def all_up(self) -> bool:
        return bool(self.links) and all(link.error is None for link in self.links)

    # -- lifetime ----------------------------------------------------------------------------------------
    async def connect(self) -> None:
        """Connect to every stage in order. A stage that is not up yet (still booting, restarting) is waited
        for, with backoff, up to the recovery timeout; a stage that answers but is the wrong one fails at once."""
        ready = asyncio.Event()
        self._supervisor = asyncio.create_task(self._supervise(ready), name="head links")
        await ready.wait()
        deadline = time.monotonic() + self.recovery_timeout
        try:
            for k in range(1, self.num_stages + 1):
                self.links.append(await self._connect_until(k, deadline))
                self._start_reader(k)
        except BaseException:
            await self.aclose()
            raise

    async def _supervise(self, ready: asyncio.Event) -> None:
        async with TaskGroup() as group:
            self._group = group
            ready.set()
            await self._stop.wait()
            for task in self._readers.values():
                task.cancel()

    async def aclose(self) -> None:
        self._stop.set()
        if self._supervisor is not None:
            await self._supervisor
        for link in self.links:
            await link.close()

    async def _connect_until(self, k: int, deadline: float) -> Link:
        """Stage k at its address or a standby's, retrying an unreachable one until `deadline`."""
        def connect_one(host: str, port: int) -> Awaitable[Link]:
            return connect(host, port, hello=self.hello, expect_index=k, secret=self.secret, limits=self.limits,
                           timeouts=self.timeouts, network=self.network, tls=self.tls)

        def waiting(address: str, waited_s: float, error: str) -> None:
            if not self._waited.get(k):
                log.warning("stage.waiting", stage=k, address=address, reason=error)
            self._waited[k] = waited_s
            if self.on_waiting is not None:
                self.on_waiting(k, address, waited_s)

        self._waited.pop(k, None)
        addresses = [self.addresses[k - 1], *self.standbys.get(k, [])]
        link = await connect_retrying(addresses, connect_one, deadline=deadline, on_wait=waiting)
        if self._waited.pop(k, None) is not None:
            log.warning("stage.reached", stage=k, address=link.name)
        return link

    def _start_reader(self, k: int) -> None:
        if self._group is None:
            raise LocalProtocolError("StageLinks.connect() first")
        old = self._readers.get(k)
        if old is not None:
            old.cancel()  # the group awaits it
        self._readers[k] = self._group.create_task(self._read(k, self.links[k - 1]), name=f"head reader {k}")

    # -- requests ----------------------------------------------------------------------------------------
    def open_inbox(self) -> tuple[int, Inbox]:
        """A fresh request id and the inbox its frames are routed to."""
        req, self._next_req = self._next_req, self._next_req + 1
        inbox = self._inboxes[req] = Inbox()
        return req, inbox

    def close_inbox(self, req: int) -> None:
        self._inboxes.pop(req, None)

    async def send(self, k: int, msg: Message) -> None:
        """Send to stage k; a broken link is a lost stage (LinkLost)."""
        try:
            size = await self.links[k - 1].send(msg)
        except (StageFailed, StageTimeout) as exc:
            raise LinkLost(k, str(exc)) from exc
        self._count(msg, size)

    async def send_quietly(self, msg: Message) -> None:
        """Send to every stage whose link is up; failures are left to the readers to report."""
        for link in self.links:
            if link.error is None:
                try:
                    self._count(msg, await link.send(msg))
                except FlowSpecError:
                    pass

    def _count(self, msg: Message, size: int) -> None:
        inbox = self._inboxes.get(getattr(msg, "req", -1))
        if inbox is not None:
            inbox.bytes_sent += size

    async def _read(self, k: int, link: Link) -> None:
        try:
            while True:
                msg = await link.recv()
                inbox = self._inboxes.get(getattr(msg, "req", -1))
                if inbox is None:
                    continue  # a late frame of a finished request
                match msg:
                    case Stats(busy=busy):
                        inbox.stats[k] = list(busy)
                        inbox.memory[k] = {"weights": msg.weight_bytes, "kv": msg.kv_bytes, "rss": msg.rss_bytes}
                        if len(inbox.stats) == self.num_stages:
                            inbox.stats_done.set()
                    case Error(code="ring", reason=reason):
                        inbox.items.put_nowait(StageLost(k, reason))
                    case Error(code=code, reason=reason):
                        inbox.items.put_nowait(StageError(k, code, reason))
                    case _:
                        inbox.items.put_nowait(msg)
        except FlowSpecError as exc:
            log.warning("stage.lost", stage=k, reason=str(exc))
            for inbox in self._inboxes.values():
                inbox.items.put_nowait(StageLost(k, str(exc)))

    # -- recovery ----------------------------------------------------------------------------------------
    async def recover(self, k: int, reason: str, generation: int | None = None) -> None:
        """Reconnect stage k (restarted, or a standby) and any other broken link, or fail after the deadline.

        `generation`: `self.generation` when the caller's try began. Every request in flight loses a lost stage
        at once; the first to get here recovers, and the others, finding the links replaced since their try
        began and all up, just try again on them.
        """
        async with self._recovering:
            if generation is not None and generation != self.generation and self.all_up:
                return
            if self.recovery_timeout <= 0:
                raise StageFailed(f"stage {k} lost: {reason}")
            log.warning("stage.recovering", stage=k, reason=reason, deadline_s=self.recovery_timeout)
            deadline = time.monotonic() + self.recovery_timeout
            broken = sorted({k} | {i for i, link in enumerate(self.links, start=1) if link.error is not None})
            for index in broken:
                await self._reconnect(index, deadline, reason)
            self.generation += 1
            log.warning("stage.recovered", stages=broken)

    async def _reconnect(self, k: int, deadline: float, reason: str) -> None:
        await self.links[k - 1].close()
        try:
            self.links[k - 1] = await self._connect_until(k, deadline)
        except FlowSpecError as exc:
            raise StageFailed(f"stage {k} lost ({reason}) and no replacement came within "
                              f"{self.recovery_timeout:.0f} s (last try: {exc})") from exc
        self._start_reader(k)
