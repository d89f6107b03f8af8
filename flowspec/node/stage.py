"""A verification stage Vk: its layers, one KV cache per request, and the ring.

Inbound: the head's control link (open, verdict, close; for V1 also prefill and segments) and the previous
stage's ring link. Outbound: the next stage's ring link, or for the last stage the head's link. Verdicts are
applied strictly in order between forwards; a segment waits only for the verdict it names (`after`).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

import structlog
import torch

from flowspec.errors import FlowSpecError, PeerProtocolError
from flowspec.model import KVCache, StageModel
from flowspec.net import (
    Close, Error, Hello, Limits, Link, LinkShape, Message, Open, Prefill, Segment, Stats, Timeouts, Verdict,
    connect,
)
from flowspec.node.compute import Compute
from flowspec.node.pacer import Pacer
from flowspec.sched.stage import StageTree

__all__ = ["StageNode"]

log = structlog.get_logger("flowspec.stage")

_MAX_ORPHANS = 256  # messages held for a request whose `open` has not arrived yet
_MAX_REQUESTS = 8  # concurrent requests per stage; each holds a KV cache
_MAX_ORPHAN_BYTES = 64 << 20  # tensor bytes held for unopened requests, all links together
_ORPHAN_TTL_S = 30.0  # a request not opened this long after its first message never will be
_MAX_FINISHED = 1024  # ids of finished requests remembered, so their late ring frames are dropped, not parked


@dataclass
class _Request:
    req: int
    cache: KVCache
    head: Link
    tree: StageTree = field(default_factory=StageTree)
    verdicts: dict[int, Verdict] = field(default_factory=dict)
    ring: deque[Prefill | Segment] = field(default_factory=deque)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    busy: list[tuple[float, float, int]] = field(default_factory=list)
    task: asyncio.Task[None] | None = None
    marks: tuple[int, int, int, int] = (0, 0, 0, 0)  # pacer overruns/steps and bytes out when opened


class StageNode:
    def __init__(self, index: int, num_stages: int, model: StageModel, hello: Hello, limits: Limits,
                 timeouts: Timeouts, secret: bytes | None, next_addresses: list[tuple[str, int]],
                 shape: LinkShape | None = None, pacer: Pacer | None = None) -> None:
        self.index, self.num_stages, self.model = index, num_stages, model
        self.hello, self.limits, self.timeouts, self.secret = hello, limits, timeouts, secret
        self.next_addresses, self.shape = next_addresses, shape  # the next stage, then its standbys
        self.pacer = pacer or Pacer()
        self.charge_bytes: Any = None  # emulated testbed: charge the profiled model's bytes on the ring hop
        self.stats_file: str | None = None  # emulated testbed: one JSON line per closed request
        self.compute = Compute()
        self.requests: dict[int, _Request] = {}
        self.orphans: dict[int, list[tuple[Verdict | Prefill | Segment, Link]]] = {}  # req -> (msg, from)
        self._orphan_born: dict[int, float] = {}  # req -> when its first message was parked
        self._orphan_bytes = 0
        self.finished: OrderedDict[int, None] = OrderedDict()  # recently freed request ids, oldest first
        self._next: Link | None = None
        self._next_lock = asyncio.Lock()
        self.log = log.bind(stage=index)

    @property
    def is_last(self) -> bool:
        return self.index == self.num_stages

    # -- inbound ---------------------------------------------------------------------------------------
    async def on_link(self, link: Link) -> None:
        """Serve one inbound link until it closes; errors close this link only."""
        role = link.peer.role
        expected_prev = self.index - 1
        if role == "stage" and link.peer.index != expected_prev:
            raise PeerProtocolError(f"stage {link.peer.index} connected, but stage {self.index}'s ring input "
                                    f"is stage {expected_prev}", code="topology")
        self.log.info("link.up", peer=link.name, role=role, index=link.peer.index)
        try:
            while True:
                msg = await link.recv()
                self._check_sender(msg, link)
                self._dispatch(msg, link)
        finally:
            if role == "head":
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
        if (len(held) >= _MAX_ORPHANS or (not held and len(self.orphans) >= _MAX_REQUESTS)
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
        if len(self.requests) >= _MAX_REQUESTS:
            raise PeerProtocolError(f"stage {self.index} already serves {_MAX_REQUESTS} requests", code="busy")
        if capacity > self.limits.max_positions + 4096:
            raise PeerProtocolError(f"capacity {capacity} is past this model's limits", code="limits")
        r = _Request(req, self.model.new_cache(capacity), head)
        r.marks = self._marks(r)
        self.requests[req] = r
        for msg, link in self._take_orphans(req):
            self._dispatch(msg, link)
        r.task = asyncio.create_task(self._work(r), name=f"stage{self.index} req{req}")
        self.log.info("request.open", req=req, capacity=capacity)

    def _close(self, req: int) -> None:
        r = self.requests.get(req)
        self._take_orphans(req)
        if r is None:
            self._free(req)  # closed before it opened here: drop what is still on its way
            return
        stats = Stats(req, tuple(r.busy[-self.limits.max_list_len:]))
        self._free(req)
        asyncio.create_task(self._send_quietly(r.head, stats))
        now = self._marks(r)
        report = {"stage": self.index, "req": req, "overruns": now[0] - r.marks[0],
                  "paced_steps": now[1] - r.marks[1],
                  "bytes_sent": now[2] - r.marks[2], "bytes_charged": now[3] - r.marks[3],
                  "worst_ratio": round(self.pacer.worst_ratio, 3)}
        self.log.info("request.closed", **report)
        if self.stats_file:
            with open(self.stats_file, "a") as out:
                out.write(json.dumps(report) + "\n")

    def _marks(self, r: _Request) -> tuple[int, int, int, int]:
        """Cumulative (overruns, paced steps, bytes sent, bytes charged) of this stage's outgoing ring hop."""
        out = r.head if self.is_last else self._next
        sent, charged = (out.bytes_sent, out.bytes_charged) if out is not None else (0, 0)
        return self.pacer.overruns, self.pacer.steps, sent, charged

    def _free(self, req: int) -> None:
        self.finished[req] = None
        if len(self.finished) > _MAX_FINISHED:
            self.finished.popitem(last=False)
        r = self.requests.pop(req, None)
        if r is not None and r.task is not None:
            r.task.cancel()

    async def _send_quietly(self, link: Link, msg: Message) -> None:
        try:
            await link.send(msg)
        except FlowSpecError as exc:
            self.log.warning("send.failed", peer=link.name, reason=str(exc))

    # -- the per-request worker --------------------------------------------------------------------------
    async def _work(self, r: _Request) -> None:
        try:
            while True:
                await r.wake.wait()
                r.wake.clear()
                while self._apply_verdicts(r) or await self._compute_one(r):
                    pass
        except asyncio.CancelledError:
            raise
        except FlowSpecError as exc:
            self.log.warning("request.failed", req=r.req, reason=str(exc))
            await self._send_quietly(r.head, Error(r.req, getattr(exc, "code", "stage"), str(exc)[:1000]))
            self._free(r.req)

    def _apply_verdicts(self, r: _Request) -> bool:
        applied = False
        while (v := r.verdicts.pop(r.tree.applied + 1, None)) is not None:
            compaction = r.tree.apply_verdict(v.seq, v.commit.tolist(), v.root, v.watermark)
            r.cache.compact(compaction.start, list(compaction.keep))
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
        n = x.shape[0]
        hidden, start, end = await self.compute.timed(self.model.forward, x, positions, r.cache, visible)
        end = await self.pacer.pace(n, start, end, ctx=r.cache.length - n)
        r.busy.append((start, end, step))
        return hidden

    async def _send_on(self, r: _Request, msg: Prefill | Segment) -> None:
        if self.is_last:
            await r.head.send(msg)
            return
        await (await self._downstream()).send(msg)

    async def _downstream(self) -> Link:
        async with self._next_lock:
            if self._next is None or self._next.error is not None:
                self._next = await self._connect_next()
            return self._next

    async def _connect_next(self) -> Link:
        """The next stage, or the first of its standbys that answers (the same order the head tries)."""
        error: FlowSpecError | None = None
        for host, port in self.next_addresses:
            try:
                link = await connect(host, port, hello=self.hello, expect_index=self.index + 1,
                                     secret=self.secret, limits=self.limits, timeouts=self.timeouts,
                                     shape=self.shape, charge_bytes=self.charge_bytes)
            except FlowSpecError as exc:
                error = exc
                continue
            self.log.info("ring.connected", next=f"{host}:{port}")
            return link
        assert error is not None, "the last stage has no next stage"
        raise error

    async def aclose(self) -> None:
        for req in list(self.requests):
            self._free(req)
        if self._next is not None:
            await self._next.close()
        self.compute.close()


def _tensor_bytes(msg: Message) -> int:
    tensors = [getattr(msg, name, None) for name in ("x", "ids", "parents", "pos", "commit")]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
