"""The head D0: tokenizer-side logits, the drafter, the scheduler, and the links to every stage.

A thin shell around `flowspec.sched.Scheduler`: it turns arriving frames into events (computing the target's
logits with the lm_head on the compute thread), hands them to the scheduler, and carries out the actions it
returns, in order. All decisions live in the scheduler.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import structlog
import torch

from flowspec.compat import timeout
from flowspec.errors import FlowSpecError, LocalProtocolError, StageFailed, StageTimeout
from flowspec.model import Drafter, LMHead
from flowspec.net import (
    ChargeBytes, Close, Error, Hello, Limits, Link, LinkShape, Message, Open, Prefill, Segment, Stats, Timeouts,
    Verdict, connect,
)
from flowspec.node.compute import Compute
from flowspec.node.pacer import Pacer
from flowspec.sched import (
    Action, Budget, BroadcastVerdict, DecodeStats, DraftJob, DraftReady, EmitTokens, Event, Finish, Prefilled, RunDraft,
    RequestState, SamplingParams, Scheduler, SegmentReturned, SendSegment, StageLost,
)

__all__ = ["GenerationResult", "HeadNode"]

log = structlog.get_logger("flowspec.head")

PREFILL_CHUNK = 60  # prompt tokens per prefill chunk: chunks overlap across stages (spec §B)


@dataclass
class GenerationResult:
    tokens: list[int] = field(default_factory=list)
    finish_reason: str = ""
    ttft_s: float = 0.0
    total_s: float = 0.0
    stats: DecodeStats = field(default_factory=DecodeStats)
    busy: dict[int, list[tuple[float, float, int]]] = field(default_factory=dict)  # stage -> intervals
    bytes_sent: int = 0  # real bytes the head put on the wire for this request
    bytes_charged: int = 0  # bytes charged on emulated links
    head_busy_s: float = 0.0  # time the head's compute thread spent (lm_head + drafting)
    overruns: int = 0
    recoveries: int = 0  # stages lost and replaced during the request

    @property
    def decode_s(self) -> float:
        return max(self.total_s - self.ttft_s, 1e-9)

    @property
    def tokens_per_s(self) -> float:
        return len(self.tokens) / self.total_s if self.total_s else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return (len(self.tokens) - 1) / self.decode_s if len(self.tokens) > 1 else 0.0

    def utilization(self, num_stages: int) -> list[float]:
        """Per-stage busy fraction over the decode phase."""
        return [min(1.0, sum(e - s for s, e, step in self.busy.get(k, []) if step > 0) / self.decode_s)
                for k in range(1, num_stages + 1)]


class _Lost(Exception):
    """Internal: stage `stage` is gone; the request may resume once it (or a standby) is back."""

    def __init__(self, stage: int, reason: str) -> None:
        super().__init__(f"stage {stage}: {reason}")
        self.stage, self.reason = stage, reason


@dataclass(frozen=True)
class _DraftFailed:
    error: Exception


@dataclass
class _Active:
    inbox: asyncio.Queue[Message | Event | _DraftFailed] = field(default_factory=asyncio.Queue)
    stats: dict[int, list[tuple[float, float, int]]] = field(default_factory=dict)
    stats_done: asyncio.Event = field(default_factory=asyncio.Event)


class HeadNode:
    def __init__(self, lm_head: LMHead, stages: Sequence[tuple[str, int]], hello: Hello, limits: Limits,
                 timeouts: Timeouts, secret: bytes | None, drafter: Drafter | None = None,
                 shape: LinkShape | None = None, charge_bytes: ChargeBytes | None = None,
                 step_timeout: float = 30.0, head_pacer: Pacer | None = None, recovery_timeout: float = 30.0,
                 standbys: dict[int, list[tuple[str, int]]] | None = None) -> None:
        self.lm_head, self.drafter = lm_head, drafter
        self.addresses = list(stages)
        self.hello, self.limits, self.timeouts, self.secret = hello, limits, timeouts, secret
        self.shape, self.charge_bytes = shape, charge_bytes
        self.step_timeout = step_timeout
        self.recovery_timeout = recovery_timeout  # 0 = fail at once when a stage is lost
        self.standbys = standbys or {}  # stage -> standby addresses serving the same layers
        self.pacer = head_pacer or Pacer()
        self.compute = Compute()
        self.links: list[Link] = []
        self._readers: list[asyncio.Task[None]] = []
        self._active: dict[int, _Active] = {}
        # Ids unique across heads: a stage drops late frames of a finished request by id, so a new head must
        # not reuse an id another head (or an earlier attempt) used on the same stages.
        self._next_req = secrets.randbits(62)

    @property
    def num_stages(self) -> int:
        return len(self.addresses)

    # -- connections -------------------------------------------------------------------------------------
    async def connect(self) -> None:
        for k, (host, port) in enumerate(self.addresses, start=1):
            shape = self.shape if k == 1 else None  # D0 -> V1 is the head's only ring hop
            link = await connect(host, port, hello=self.hello, expect_index=k, secret=self.secret,
                                 limits=self.limits, timeouts=self.timeouts, shape=shape,
                                 charge_bytes=self.charge_bytes)
            self.links.append(link)
            self._readers.append(asyncio.create_task(self._read(k, link), name=f"head reader {k}"))

    async def aclose(self) -> None:
        for task in self._readers:
            task.cancel()
        for task in self._readers:
            try:
                await task
            except (asyncio.CancelledError, FlowSpecError):
                pass
        for link in self.links:
            await link.close()
        await self.compute.aclose()

    async def _read(self, k: int, link: Link) -> None:
        """Route every inbound frame of stage k's link to its request; a dead link fails every request."""
        try:
            while True:
                msg = await link.recv()
                req = getattr(msg, "req", None)
                active = self._active.get(req) if req is not None else None
                if active is None:
                    continue  # a late frame of a finished request
                if isinstance(msg, Stats):
                    active.stats[k] = list(msg.busy)
                    if len(active.stats) == self.num_stages:
                        active.stats_done.set()
                elif isinstance(msg, Error):
                    active.inbox.put_nowait(StageLost(k, f"{msg.code}: {msg.reason}"))
                else:
                    active.inbox.put_nowait(msg)
        except FlowSpecError as exc:
            log.warning("stage.lost", stage=k, reason=str(exc))
            for active in self._active.values():
                active.inbox.put_nowait(StageLost(k, str(exc)))

    # -- one request ----------------------------------------------------------------------------------------
    async def generate(self, prompt: Sequence[int], budget: Budget, sampling: SamplingParams,
                       max_new_tokens: int, eos_ids: Sequence[int] = (),
                       result: GenerationResult | None = None) -> AsyncIterator[list[int]]:
        """Yield committed tokens as they come. `result` (if given) is filled with tokens and statistics.

        When a stage is lost, the committed tokens are kept: once the stage (or a standby) is back, the request
        is re-opened on every stage, the committed tokens are prefilled again, and decoding resumes where it
        stopped. Without a replacement within `recovery_timeout` the request fails with StageFailed.
        """
        if not self.links:
            raise LocalProtocolError("HeadNode.connect() first")
        if budget.mode.value != "ar" and self.drafter is None:
            raise LocalProtocolError(f"mode {budget.mode.value} needs a drafter")
        result = result if result is not None else GenerationResult()
        sent_before = sum(link.bytes_sent for link in self.links)
        charged_before = sum(link.bytes_charged for link in self.links)
        start = time.monotonic()
        committed = list(prompt)
        try:
            while True:
                attempt = self._attempt(len(prompt), committed, budget, sampling, max_new_tokens, eos_ids, result)
                try:
                    async for tokens in attempt:
                        if not result.tokens:
                            result.ttft_s = time.monotonic() - start
                        result.tokens.extend(tokens)
                        yield tokens
                    return
                except _Lost as lost:
                    committed = list(prompt) + result.tokens
                    await self._recover(lost.stage, lost.reason)
                    result.recoveries += 1
                finally:
                    await attempt.aclose()
        finally:
            result.total_s = time.monotonic() - start
            result.bytes_sent = sum(link.bytes_sent for link in self.links) - sent_before
            result.bytes_charged = sum(link.bytes_charged for link in self.links) - charged_before
            result.overruns += self.pacer.overruns

    async def _attempt(self, prompt_len: int, committed: list[int], budget: Budget, sampling: SamplingParams,
                       max_new_tokens: int, eos_ids: Sequence[int],
                       result: GenerationResult) -> AsyncIterator[list[int]]:
        """One try at the request on the current links: fresh, or resumed from `committed` after a loss."""
        req, self._next_req = self._next_req, self._next_req + 1
        active = self._active[req] = _Active()
        max_context = prompt_len + max_new_tokens + 1
        actions: list[Action] = []
        if len(committed) > prompt_len:
            sched, actions = Scheduler.resume(prompt_len, committed, budget, sampling, max_new_tokens, eos_ids,
                                              max_context)
            prefill = committed[:-1]
        else:
            sched = Scheduler(committed, budget, sampling, max_new_tokens, eos_ids, max_context=max_context)
            prefill = committed
        drafts: set[asyncio.Task[None]] = set()
        try:
            capacity = max_context + budget.tree_slack + 1
            for k in range(1, self.num_stages + 1):
                await self._send(k, Open(req, capacity))
            await self._send_prefill(req, prefill)
            while True:
                for action in actions:
                    tokens = await self._do(action, req, sched, active, drafts)
                    if tokens:
                        yield tokens
                if sched.done:
                    break
                event = await self._next_event(active, sched)
                actions = sched.handle(event) if event is not None else []
            if sched.error:
                raise StageFailed(f"request failed: {sched.error}")
        finally:
            for task in drafts:
                task.cancel()
            result.finish_reason = sched.finish_reason or "cancelled"
            result.stats = sched.stats
            await self._close_request(req, active, result)

    async def _send(self, k: int, msg: Message) -> None:
        """Send to stage k; a broken link is a lost stage."""
        try:
            await self.links[k - 1].send(msg)
        except (StageFailed, StageTimeout) as exc:
            raise _Lost(k, str(exc)) from exc

    async def _recover(self, k: int, reason: str) -> None:
        """Reconnect stage k (restarted, or a standby) and any other broken link, or fail after the deadline."""
        if self.recovery_timeout <= 0:
            raise StageFailed(f"stage {k} lost: {reason}")
        log.warning("stage.recovering", stage=k, reason=reason, deadline_s=self.recovery_timeout)
        deadline = time.monotonic() + self.recovery_timeout
        broken = sorted({k} | {i for i, link in enumerate(self.links, start=1) if link.error is not None})
        for index in broken:
            await self._reconnect(index, deadline, reason)
        log.warning("stage.recovered", stages=broken)

    async def _reconnect(self, k: int, deadline: float, reason: str) -> None:
        old = self.links[k - 1]
        await old.close()
        self._readers[k - 1].cancel()
        delay = 0.2
        last_error = reason
        while time.monotonic() < deadline:
            for host, port in [self.addresses[k - 1], *self.standbys.get(k, [])]:
                try:
                    link = await connect(host, port, hello=self.hello, expect_index=k, secret=self.secret,
                                         limits=self.limits, timeouts=self.timeouts,
                                         shape=self.shape if k == 1 else None, charge_bytes=self.charge_bytes)
                except FlowSpecError as exc:
                    last_error = str(exc)
                    continue
                self.links[k - 1] = link
                self._readers[k - 1] = asyncio.create_task(self._read(k, link), name=f"head reader {k}")
                return
            await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 2.0)
        raise StageFailed(f"stage {k} lost ({reason}) and no replacement came within "
                          f"{self.recovery_timeout:.0f} s (last try: {last_error})")

    async def _next_event(self, active: _Active, sched: Scheduler) -> Event | None:
        idle = not sched.in_flight and not sched.drafting and active.inbox.empty()
        if idle and sched.state is RequestState.DECODING:
            raise LocalProtocolError("scheduler is waiting for nothing: nothing in flight, no draft running")
        try:
            async with timeout(self.step_timeout):
                item = await active.inbox.get()
        except TimeoutError:
            raise StageTimeout(f"no progress for {self.step_timeout:.0f} s: a stage is stalled or too slow "
                               f"(segments in flight: {sorted(sched.in_flight)}; draft job running: "
                               f"{sched.drafting})") from None
        if isinstance(item, StageLost):
            raise _Lost(item.stage, item.reason)
        if isinstance(item, _DraftFailed):
            raise FlowSpecError(f"the drafter failed: {item.error!r}") from item.error
        return await self._to_event(item, sched)

    async def _to_event(self, item: Message | Event, sched: Scheduler) -> Event | None:
        match item:
            case Prefill(last=True, x=x) if sched.state is RequestState.PREFILLING:
                logits = await self._logits(x)
                return Prefilled(logits[-1])
            case Segment(step=step, ids=ids, x=x):
                id_list = ids.tolist()
                live = [i for i, node_id in enumerate(id_list) if sched.is_live(node_id)]
                logits = await self._logits(x[live]) if live else torch.zeros(0, 1)
                return SegmentReturned(step, tuple(id_list[i] for i in live), logits)
            case Prefill():
                return None
            case _:
                return item  # type: ignore[return-value]  # an Event put by a reader or a draft task

    async def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        out, start, end = await self.compute.timed(self.lm_head.forward, hidden)
        await self.pacer.pace(hidden.shape[0], start, end)
        return out

    async def _do(self, action: object, req: int, sched: Scheduler, active: _Active,
                  drafts: set[asyncio.Task[None]]) -> list[int]:
        match action:
            case SendSegment():
                await self._send(1, Segment(
                    req, action.step, action.after, _ids(action.ids), _ids(action.parents),
                    _ids(action.positions), _ids(action.tokens)))
            case BroadcastVerdict():
                verdict = Verdict(req, action.seq, _ids(action.commit), action.root, action.watermark)
                for k in range(1, self.num_stages + 1):
                    await self._send(k, verdict)
            case RunDraft(job=job):
                task = asyncio.create_task(self._draft(job, active, sched))
                drafts.add(task)
                task.add_done_callback(drafts.discard)
            case EmitTokens(tokens=tokens):
                return list(tokens)
            case Finish():
                pass
        return []

    async def _draft(self, job: DraftJob, active: _Active, sched: Scheduler) -> None:
        """Drive a draft job one tree level per compute job, so a returned segment's lm_head and verification
        run between levels instead of waiting for the whole expansion (the head is the pipeline's bottleneck
        when drafting is slow). A job whose anchor died meanwhile is abandoned."""
        drafter = self.drafter
        assert drafter is not None

        def start() -> None:
            drafter.sync(job.context)
            drafter.reset_scratch()

        try:
            await self.compute.run(start)
            while (request := job.next_request()) is not None:
                if not sched.draft_useful(job):
                    job.abandon()
                    break
                logprobs = await self.compute.run(drafter.expand, list(request.tokens), list(request.parents),
                                                  list(request.positions))
                job.feed(logprobs)
        except asyncio.CancelledError:
            active.inbox.put_nowait(_DraftFailed(RuntimeError("draft job cancelled")))
            raise
        except Exception as exc:  # a drafter bug must fail the request, not leave it waiting for the job
            active.inbox.put_nowait(_DraftFailed(exc))
            return
        active.inbox.put_nowait(DraftReady(job))

    async def _send_prefill(self, req: int, prompt: Sequence[int]) -> None:
        ids = torch.tensor(list(prompt), dtype=torch.long)
        size = min(PREFILL_CHUNK, self.limits.max_rows)
        chunks = max(1, -(-len(prompt) // size))
        bounds = [round(i * len(prompt) / chunks) for i in range(chunks + 1)]  # nearly equal chunks
        for c in range(chunks):
            a, b = bounds[c], bounds[c + 1]
            await self._send(1, Prefill(req, c, c == chunks - 1, a, ids[a:b]))

    async def _close_request(self, req: int, active: _Active, result: GenerationResult) -> None:
        for link in self.links:
            if link.error is None:
                try:
                    await link.send(Close(req))
                except FlowSpecError:
                    pass
        if all(link.error is None for link in self.links):  # after a loss, do not wait for the dead
            try:
                async with timeout(2.0):
                    await active.stats_done.wait()
            except TimeoutError:
                pass
        result.busy = dict(active.stats)
        del self._active[req]


def _ids(values: Sequence[int]) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.long)
