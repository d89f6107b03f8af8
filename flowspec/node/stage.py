"""A verification stage Vk: its layers, one KV cache per request, and the ring.

Inbound: the head's control link (open, verdict, close; for V1 also prefill and segments) and the previous
stage's ring link. Outbound: the next stage's ring link, or for the last stage the head's link. Verdicts are
applied strictly in order between forwards; a segment waits only for the verdict it names (`after`).

What heads can make a stage hold is bounded: at most `MAX_REQUESTS` open requests, all heads together, each with
one KV cache of at most the model's context plus `_TREE_SLACK_MAX` slots, allocated at `open`. A request's cache
and queued rows are dropped the moment it ends (closed, failed, or its head gone), and the C heap's free pages
are handed back to the system then (`return_free_memory`), so the process's memory goes back down as well.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import os
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace

import structlog
import torch

from flowspec.compat import TIMEOUT_ERRORS, TaskGroup, timeout
from flowspec.errors import FlowSpecError, LocalProtocolError, PeerProtocolError
from flowspec.model import KVCache, StageModel
from flowspec.net import (
    MAX_REQUESTS,
    Close,
    Error,
    Hello,
    Limits,
    Link,
    Message,
    Open,
    Prefill,
    Segment,
    Stats,
    Timeouts,
    TlsConfig,
    Verdict,
    connect,
    connect_retrying,
)
from flowspec.node.backend import Backend, Work, WorkKind
from flowspec.node.probe import probe_stage
from flowspec.sched.stage import StageTree

__all__ = ["StageNode"]

log = structlog.get_logger("flowspec.stage")

_MAX_ORPHANS = 256  # messages held for a request whose `open` has not arrived yet
_MAX_ORPHAN_BYTES = 64 << 20  # tensor bytes held for unopened requests, all links together
_ORPHAN_TTL_S = 30.0  # a request not opened this long after its first message never will be
_TREE_SLACK_MAX = 4096  # KV slots a request may ask for beyond the context, for its draft tree
_RING_CONNECT_S = 10.0  # how long to wait for a next stage that is down; the head recovers it if it stays down
_MAX_FINISHED = 1024  # ids of finished requests remembered, so their late ring frames are dropped, not parked


@dataclass
class _Request:
    req: int
    cache: KVCache | None  # None once the request is freed: its memory goes back at once
    head: Link
    tree: StageTree = field(default_factory=StageTree)
    verdicts: dict[int, Verdict] = field(default_factory=dict)
    ring: deque[Prefill | Segment] = field(default_factory=deque)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    busy: list[tuple[float, float, int]] = field(default_factory=list)
    task: asyncio.Task[None] | None = None

    @property
    def kv(self) -> KVCache:
        if self.cache is None:
            raise LocalProtocolError(f"request {self.req} was freed")
        return self.cache


class _RingBroken(Exception):
    """Internal: this stage could not pass a result on (the next stage or the head is unreachable)."""


class StageNode:
    """One stage. Each head link's `on_link` owns, in its TaskGroup, the workers of the requests it opened."""

    def __init__(self, index: int, num_stages: int, model: StageModel, hello: Hello, limits: Limits,
                 timeouts: Timeouts, secret: bytes | None, next_addresses: list[tuple[str, int]],
                 backend: Backend | None = None, tls: TlsConfig | None = None) -> None:
        self.index, self.num_stages, self.model = index, num_stages, model
        self.hello, self.limits, self.timeouts, self.secret = hello, limits, timeouts, secret
        self.next_addresses = next_addresses  # the next stage, then its standbys
        self.tls = tls  # mutual TLS on the ring link too, or None for plain TCP
        self.backend = backend or Backend()
        self.requests: dict[int, _Request] = {}
        self.orphans: dict[int, list[tuple[Verdict | Prefill | Segment, Link]]] = {}  # req -> (msg, from)
        self._orphan_born: dict[int, float] = {}  # req -> when its first message was parked
        self._orphan_bytes = 0
        self.finished: OrderedDict[int, None] = OrderedDict()  # recently freed request ids, oldest first
        self._next: Link | None = None
        self._next_lock = asyncio.Lock()
        self._groups: dict[Link, TaskGroup] = {}  # head link -> the group owning its requests' tasks
        self._served = asyncio.Event()  # set while no link is being served (aclose waits for it)
        self._served.set()
        self.log = log.bind(stage=index)

    @property
    def is_last(self) -> bool:
        return self.index == self.num_stages

    async def probe(self) -> None:
        """Measure this stage's forward cost on its backend and announce it in its hello (before serving), so
        the head can pick tree budgets for this device."""
        self.hello = replace(self.hello, costs=await probe_stage(self.model, self.backend))

    # -- inbound ---------------------------------------------------------------------------------------
    async def on_link(self, link: Link) -> None:
        """Serve one inbound link until it closes; errors close this link only."""
        role = link.peer.role
        expected_prev = self.index - 1
        if role == "stage" and link.peer.index != expected_prev:
            raise PeerProtocolError(f"stage {link.peer.index} connected, but stage {self.index}'s ring input "
                                    f"is stage {expected_prev}", code="topology")
        self.log.info("link.up", peer=link.name, role=role, index=link.peer.index)
        error: FlowSpecError | None = None
        self._served.clear()
        try:
            async with TaskGroup() as tasks:
                self._groups[link] = tasks
                try:
                    while True:
                        msg = await link.recv()
                        self._check_sender(msg, link)
                        self._dispatch(msg, link)
                except FlowSpecError as exc:
                    error = exc  # raised after the group: its tasks are cancelled and awaited first
                finally:
                    self._release(link)
        finally:
            del self._groups[link]
            if not self._groups:
                self._served.set()
        if error is not None:
            raise error

    def _release(self, link: Link) -> None:
        """`link` is closing: free the requests it opened and drop what it parked."""
        if link.peer.role == "head":
            for r in [r for r in self.requests.values() if r.head is link]:
                self.log.warning("request.orphaned", req=r.req, reason="head link closed")
                self._free(r.req)
        for req in list(self.orphans):  # what a closed link parked will never be claimed by it
            self._take_orphans(req, link)

    def _check_sender(self, msg: Message, link: Link) -> None:
        """Requests are opened, judged and closed by the head only; ring rows come from the ring input only."""
        role = link.peer.role
        if isinstance(msg, (Open, Close, Verdict)) and role != "head":
            raise PeerProtocolError(f"{msg.kind!r} from {role} {link.peer.index}: only the head sends it",
                                    code="role")
        if isinstance(msg, (Prefill, Segment)) and (role == "head") != (self.index == 1):
            raise PeerProtocolError(f"{msg.kind!r} from {role} {link.peer.index}: stage {self.index}'s ring "
                                    f"input is {'the head' if self.index == 1 else f'stage {self.index - 1}'}",
                                    code="role")

    def _dispatch(self, msg: Message, link: Link) -> None:
        match msg:
            case Open(req=req, capacity=capacity):
                self._open(req, capacity, link)
            case Close(req=req):
                self._close(req)
            case Verdict() | Prefill() | Segment():
                r = self.requests.get(msg.req)
                if r is None and msg.req in self.finished:
                    return  # in flight when its request ended (closed, failed, or its head was lost)
                if r is None:
                    self._park(msg, link)
                    return
                if isinstance(msg, Verdict):
                    r.verdicts[msg.seq] = msg
                else:
                    r.ring.append(msg)
                r.wake.set()
            case _:
                raise PeerProtocolError(f"stage does not accept {type(msg).__name__} messages", code="kind")

    def _park(self, msg: Verdict | Prefill | Segment, link: Link) -> None:
        now = time.monotonic()
        for req in [req for req, born in self._orphan_born.items() if now - born > _ORPHAN_TTL_S]:
            dropped = self._take_orphans(req)
            self.log.warning("orphans.expired", req=req, messages=len(dropped))
        held = self.orphans.get(msg.req, [])
        size = _tensor_bytes(msg)
        if (len(held) >= _MAX_ORPHANS or (not held and len(self.orphans) >= MAX_REQUESTS)
                or self._orphan_bytes + size > _MAX_ORPHAN_BYTES):
            raise PeerProtocolError(f"too many messages for request {msg.req}, which was never opened",
                                    code="limits")
        self.orphans[msg.req] = held
        self._orphan_born.setdefault(msg.req, now)
        held.append((msg, link))
        self._orphan_bytes += size

    def _take_orphans(self, req: int, link: Link | None = None) -> list[tuple[Verdict | Prefill | Segment, Link]]:
        """Remove and return what is parked for `req` (only what `link` sent, when given)."""
        held = self.orphans.pop(req, [])
        taken = [item for item in held if link is None or item[1] is link]
        kept = [item for item in held if link is not None and item[1] is not link]
        if kept:
            self.orphans[req] = kept
        else:
            self._orphan_born.pop(req, None)
        self._orphan_bytes -= sum(_tensor_bytes(msg) for msg, _ in taken)
        return taken

    def _open(self, req: int, capacity: int, head: Link) -> None:
        if req in self.requests or req in self.finished:
            raise PeerProtocolError(f"request {req} opened twice", code="order")
        refusal = self._refusal(capacity)
        if refusal is not None:  # this request cannot be served here; the link and the others go on
            code, reason = refusal
            self.log.warning("request.refused", req=req, code=code, reason=reason)
            self._free(req)
            self._take_orphans(req)
            self._groups[head].create_task(self._send_quietly(head, Error(req, code, reason)),
                                           name=f"stage{self.index} refuse")
            return
        r = _Request(req, self.model.new_cache(capacity), head)
        self.requests[req] = r
        for msg, link in self._take_orphans(req):
            self._dispatch(msg, link)
        r.task = self._groups[head].create_task(self._work(r), name=f"stage{self.index} req{req}")
        self.log.info("request.open", req=req, capacity=capacity)

    def _refusal(self, capacity: int) -> tuple[str, str] | None:
        """Why a request of `capacity` KV slots cannot be opened here, as (code, reason), or None."""
        if len(self.requests) >= MAX_REQUESTS:
            return "busy", f"stage {self.index} already serves {MAX_REQUESTS} requests; retry when one ends"
        if capacity > self.limits.max_positions + _TREE_SLACK_MAX:
            return "limits", (f"stage {self.index}: a request of {capacity} KV slots is past this model's "
                              f"context of {self.limits.max_positions} positions")
        return None

    def _close(self, req: int) -> None:
        r = self.requests.get(req)
        kv_bytes = r.kv.nbytes if r is not None else 0
        self._take_orphans(req)
        self._free(req)  # before it opened here, too: drop what is still on its way
        if r is None:
            return
        stats = Stats(req, tuple(r.busy[-self.limits.max_list_len:]), weight_bytes=self.model.weight_bytes,
                      kv_bytes=kv_bytes, rss_bytes=resident_bytes())
        self._groups[r.head].create_task(self._send_quietly(r.head, stats), name=f"stage{self.index} stats")
        self.log.info("request.closed", req=req, steps=len(r.busy))

    def _free(self, req: int) -> None:
        self.finished[req] = None
        if len(self.finished) > _MAX_FINISHED:
            self.finished.popitem(last=False)
        r = self.requests.pop(req, None)
        if r is None:
            return
        if r.task is not None and r.task is not asyncio.current_task():
            r.task.cancel()  # its group (the head link's on_link) awaits it
        # Drop what it holds now, not when the garbage collector finds the cycle request -> task -> traceback ->
        # request: the cache goes back at once (or when a forward still running on it ends), its rows too.
        r.cache, r.task = None, None
        r.ring.clear()
        r.verdicts.clear()
        self.backend.request_closed(req)
        return_free_memory()

    async def _send_quietly(self, link: Link, msg: Message) -> None:
        try:
            await link.send(msg)
        except FlowSpecError as exc:
            self.log.warning("send.failed", peer=link.name, reason=str(exc))

    # -- the per-request worker --------------------------------------------------------------------------
    async def _work(self, r: _Request) -> None:
        """Apply verdicts and compute, in order, until cancelled. Any failure is reported to the head at once
        as an Error frame naming this stage (a torch RuntimeError too), and frees the request here."""
        try:
            while True:
                await r.wake.wait()
                r.wake.clear()
                while self._apply_verdicts(r) or await self._compute_one(r):
                    pass
        except asyncio.CancelledError:
            raise
        except _RingBroken as exc:  # the head sees a lost stage and recovers the pipeline
            await self._fail(r, "ring", f"stage {self.index} cannot pass results on: {exc}")
        except FlowSpecError as exc:
            await self._fail(r, getattr(exc, "code", "stage"), f"stage {self.index}: {exc}")
        except Exception as exc:  # out of memory, a shape bug: fail this request, keep serving the others
            self.log.exception("request.compute_failed", req=r.req)
            await self._fail(r, "compute", f"stage {self.index} failed computing: {type(exc).__name__}: {exc}")

    async def _fail(self, r: _Request, code: str, reason: str) -> None:
        self.log.warning("request.failed", req=r.req, code=code, reason=reason)
        self._free(r.req)
        await self._send_quietly(r.head, Error(r.req, code, reason[:1000]))

    def _apply_verdicts(self, r: _Request) -> bool:
        applied = False
        while (v := r.verdicts.pop(r.tree.applied + 1, None)) is not None:
            compaction = r.tree.apply_verdict(v.seq, v.commit.tolist(), v.root, v.watermark)
            r.kv.compact(compaction.start, list(compaction.keep))
            applied = True
        return applied

    async def _compute_one(self, r: _Request) -> bool:
        if not r.ring:
            return False
        msg = r.ring[0]
        if isinstance(msg, Segment) and msg.after > r.tree.applied:
            return False  # wait for the verdict it was built after
        r.ring.popleft()
        out = await (self._prefill(r, msg) if isinstance(msg, Prefill) else self._segment(r, msg))
        if out is not None:
            await self._send_on(r, out)
        return True

    async def _prefill(self, r: _Request, msg: Prefill) -> Prefill | None:
        n = msg.x.shape[0]
        if msg.start != r.tree.cache_len:
            raise PeerProtocolError(f"prefill chunk {msg.chunk} starts at {msg.start}, cache holds "
                                    f"{r.tree.cache_len}", code="order")
        positions = torch.arange(msg.start, msg.start + n)
        hidden = await self._forward(r, msg.x, positions, None, step=0)  # step 0: prefill
        r.tree.prefilled(n)
        if self.is_last:  # the head needs only the last prompt position's hidden state
            return Prefill(r.req, msg.chunk, msg.last, msg.start + n - 1, hidden[-1:]) if msg.last else None
        return Prefill(r.req, msg.chunk, msg.last, msg.start, hidden)

    async def _segment(self, r: _Request, msg: Segment) -> Segment:
        admission = r.tree.admit(msg.ids.tolist(), msg.parents.tolist())
        rows = torch.tensor(admission.rows, dtype=torch.long)
        if admission.visible is None:
            empty_x = msg.x[:0] if self.index > 1 else torch.zeros(0, self.model.cfg.hidden_size)
            return Segment(r.req, msg.step, msg.after, msg.ids[:0], msg.parents[:0], msg.pos[:0], empty_x)
        hidden = await self._forward(r, msg.x[rows], msg.pos[rows], admission.visible, step=msg.step)
        return Segment(r.req, msg.step, msg.after, msg.ids[rows], msg.parents[rows], msg.pos[rows], hidden)

    async def _forward(self, r: _Request, x: torch.Tensor, positions: torch.Tensor,
                       visible: torch.Tensor | None, step: int) -> torch.Tensor:
        if self.index == 1 and x.dtype != torch.int64:
            raise PeerProtocolError("stage 1 takes token ids (int64)", code="dtype")
        if self.index > 1 and not x.is_floating_point():
            raise PeerProtocolError(f"stage {self.index} takes hidden states, got {x.dtype}", code="dtype")
        cache = r.kv
        work = Work(WorkKind.STAGE_FORWARD, rows=x.shape[0], context=cache.length)
        hidden, start, end = await self.backend.run(work, self.model.forward, x, positions, cache, visible)
        r.busy.append((start, end, step))
        return hidden

    async def _send_on(self, r: _Request, msg: Prefill | Segment) -> None:
        try:
            if self.is_last:
                await r.head.send(msg)
                return
            await (await self._downstream()).send(msg)
        except FlowSpecError as exc:
            raise _RingBroken(str(exc)) from exc

    async def _downstream(self) -> Link:
        async with self._next_lock:
            if self._next is None or self._next.error is not None:
                self._next = await self._connect_next()
            return self._next

    async def _connect_next(self) -> Link:
        """The next stage, or the first of its standbys that answers (the same order the head tries); one that
        is still booting or restarting is waited for, with backoff, for up to `_RING_CONNECT_S`."""
        def connect_one(host: str, port: int) -> Awaitable[Link]:
            return connect(host, port, hello=self.hello, expect_index=self.index + 1, secret=self.secret,
                           limits=self.limits, timeouts=self.timeouts, network=self.backend.network,
                           tls=self.tls)

        def waiting(address: str, waited_s: float, error: str) -> None:
            self.log.warning("ring.waiting", next=address, waited_s=round(waited_s, 1), reason=error)

        link = await connect_retrying(self.next_addresses, connect_one,
                                      deadline=time.monotonic() + _RING_CONNECT_S, on_wait=waiting)
        self.log.info("ring.connected", next=link.name)
        return link

    async def aclose(self) -> None:
        """Free every request, close every link and wait for their tasks, then stop the compute thread."""
        for req in list(self.requests):
            self._free(req)
        for link in list(self._groups):
            await link.close()
        try:
            async with timeout(5.0):
                await self._served.wait()
        except TIMEOUT_ERRORS:
            self.log.warning("node.close_timeout", links=len(self._groups))
        if self._next is not None:
            await self._next.close()
        await self.backend.aclose()


def resident_bytes() -> int:
    """This process's resident set size (Linux /proc; elsewhere the peak, from getrusage)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _load_malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None where the C library has none (macOS, musl)."""
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None
    if trim is not None:
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


_MALLOC_TRIM = _load_malloc_trim()


def return_free_memory() -> None:
    """Hand the C heap's free pages back to the system. A large tensor's pages go back when it is freed, but the
    smaller buffers of forwards (and caches under glibc's mmap threshold) stay resident in the heap unless it is
    trimmed. A no-op without glibc."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _tensor_bytes(msg: Message) -> int:
    tensors = [getattr(msg, name, None) for name in ("x", "ids", "parents", "pos", "commit")]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
