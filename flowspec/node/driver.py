"""One try at one request: the thin loop between the scheduler and the pipeline.

It opens the request on every stage and prefills it, then turns what arrives into scheduler events (a
returned segment gets the target's logits from the lm_head; a finished draft job; a lost or failing stage)
and carries out the actions the scheduler returns, in order. Draft jobs run as tasks of the driver's
TaskGroup; the close on every stage runs to its end even when the driver is cancelled.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from flowspec.compat import TIMEOUT_ERRORS, TaskGroup, shielded, timeout
from flowspec.errors import LocalProtocolError, ModelError, StageFailed, StageTimeout
from flowspec.net import Close, Message, Open, Prefill, Segment, Verdict
from flowspec.node.backend import Backend, Work, WorkKind
from flowspec.node.links import DraftFailed, LinkLost, StageLinks
from flowspec.sched import (
    Action,
    BroadcastVerdict,
    Cancelled,
    DecodeStats,
    DraftError,
    DraftJob,
    DraftReady,
    EmitTokens,
    Event,
    Finish,
    Prefilled,
    RequestState,
    RunDraft,
    Scheduler,
    SegmentReturned,
    SendSegment,
    StageError,
    StageLost,
    StepTimedOut,
)

__all__ = ["DraftStateLike", "DrafterLike", "GenerationResult", "LMHeadLike", "RequestDriver"]

PREFILL_CHUNK = 60  # prompt tokens per prefill chunk: chunks overlap across stages (spec §B)
STATS_WAIT_S = 2.0  # how long a close waits for every stage's busy intervals (they come right after close)


@dataclass
class GenerationResult:
    tokens: list[int] = field(default_factory=list)
    finish_reason: str = ""
    ttft_s: float = 0.0
    total_s: float = 0.0
    stats: DecodeStats = field(default_factory=DecodeStats)
    busy: dict[int, list[tuple[float, float, int]]] = field(default_factory=dict)  # stage -> intervals
    stage_memory: dict[int, dict[str, int]] = field(default_factory=dict)  # stage -> weights/kv/rss bytes
    head_busy: list[tuple[float, float, str]] = field(default_factory=list)  # head compute: (start, end, kind)
    bytes_sent: int = 0  # real bytes the head put on the wire for this request
    recoveries: int = 0  # stages lost and replaced during the request
    verdict_times: list[float] = field(default_factory=list)  # monotonic time of each verdict broadcast

    @property
    def decode_s(self) -> float:
        return max(self.total_s - self.ttft_s, 1e-9)

    @property
    def tokens_per_s(self) -> float:
        return len(self.tokens) / self.total_s if self.total_s else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return (len(self.tokens) - 1) / self.decode_s if len(self.tokens) > 1 else 0.0

    @property
    def head_busy_s(self) -> float:
        """Time the head's compute thread spent on this request (lm_head and drafting)."""
        return sum(end - start for start, end, _ in self.head_busy)

    def utilization(self, num_stages: int) -> list[float]:
        """Per-stage busy fraction over the decode phase."""
        return [min(1.0, sum(e - s for s, e, step in self.busy.get(k, []) if step > 0) / self.decode_s)
                for k in range(1, num_stages + 1)]


class DraftStateLike(Protocol):
    """What a driver needs of one request's drafting state (flowspec.model.DraftState)."""

    @property
    def pending(self) -> int: ...

    def sync(self, committed: Sequence[int]) -> None: ...

    def reset_scratch(self) -> None: ...

    def begin_job(self) -> None: ...

    def rows_to_forward(self, tokens: Sequence[int], parents: Sequence[int]) -> int: ...

    def expand(self, tokens: list[int], parents: list[int], positions: list[int]) -> torch.Tensor: ...


class DrafterLike(Protocol):
    """What the head needs of a drafter (flowspec.model.Drafter): shared weights, a fresh state per request."""

    def new_state(self, capacity: int | None = None) -> DraftStateLike: ...


class LMHeadLike(Protocol):
    def forward(self, hidden: torch.Tensor) -> torch.Tensor: ...


class RequestDriver:
    """Drives `sched` through the pipeline until it is done; `emit` receives committed tokens in order.

    `drafter` is this request's own drafting state (other requests in flight draft in theirs); the compute
    thread runs every request's jobs one at a time, so a state is only touched by its own job in order.
    """

    def __init__(self, sched: Scheduler, prefill: Sequence[int], links: StageLinks, lm_head: LMHeadLike,
                 drafter: DraftStateLike | None, backend: Backend, result: GenerationResult,
                 step_timeout: float) -> None:
        self.sched, self.prefill, self.links, self.lm_head = sched, list(prefill), links, lm_head
        self.drafter, self.backend, self.result, self.step_timeout = drafter, backend, result, step_timeout
        self.req, self.inbox = links.open_inbox()
        self._jobs: TaskGroup | None = None
        self._drafts: set[asyncio.Task[None]] = set()  # running draft jobs (owned by `_jobs`)
        self._failure: Event | None = None  # the event that moved the scheduler to ERROR, when one did
        self._draft_error: BaseException | None = None  # what a failed draft job raised

    async def run(self, actions: list[Action], emit: Callable[[list[int]], Awaitable[None] | None]) -> None:
        """Carry out `actions` (a resumed scheduler's first ones), then drive the request to its end.

        Every failure the shell sees is an event the scheduler consumes; once it is in ERROR this raises what
        that failure means for the caller (`_failure_error`): LinkLost when a stage was lost (the head may
        recover and resume), StageTimeout when nothing moved for `step_timeout`, ModelError when the drafter
        failed, StageFailed when a stage failed the request. A stage's frame that contradicts the scheduler's
        ledger (PeerProtocolError) and bugs come out of the TaskGroup inside an ExceptionGroup (flowspec.api
        unwraps it).
        """
        sched = self.sched
        try:
            async with TaskGroup() as jobs:
                self._jobs = jobs
                actions = await self._start(actions)
                while True:
                    actions = await self._carry_out(actions, emit)
                    if sched.done:
                        break
                    if not actions:
                        event = await self._next_event()
                        actions = self._handle(event) if event is not None else []
                for task in self._drafts:
                    task.cancel()  # a job still running is of no use now; the group awaits it
        except asyncio.CancelledError:
            if not sched.done:
                sched.handle(Cancelled())
            raise
        finally:
            await shielded(self._close())
        if sched.state is RequestState.ERROR and self._failure is not None:
            raise self._failure_error(self._failure)

    def _handle(self, event: Event) -> list[Action]:
        sched = self.sched
        actions = sched.handle(event)
        if sched.state is RequestState.ERROR and self._failure is None:
            self._failure = event
        return actions

    def _failure_error(self, failure: Event) -> Exception:
        reason = self.sched.error or "failed"
        match failure:
            case StageLost(stage=stage, reason=lost):
                return LinkLost(stage, lost)
            case StepTimedOut():
                return StageTimeout(reason)
            case DraftError():
                error = ModelError(reason)
                error.__cause__ = self._draft_error
                return error
        return StageFailed(f"request failed: {reason}")

    async def _start(self, actions: list[Action]) -> list[Action]:
        """Open the request on every stage and send the prefill; a lost stage becomes the scheduler's event."""
        capacity = self.sched.stage_capacity
        try:
            for k in range(1, self.links.num_stages + 1):
                await self.links.send(k, Open(self.req, capacity))
            await self._send_prefill()
        except LinkLost as lost:
            return self._handle(StageLost(lost.stage, lost.reason))
        return actions

    async def _carry_out(self, actions: list[Action], emit: Callable[[list[int]], Awaitable[None] | None]
                         ) -> list[Action]:
        """Do `actions` in order. A send to a lost stage stops there and returns the scheduler's answer to
        that loss (the rest would go to a dead pipeline)."""
        for action in actions:
            try:
                tokens = await self._do(action)
            except LinkLost as lost:
                return self._handle(StageLost(lost.stage, lost.reason))
            if tokens:
                out = emit(tokens)
                if out is not None:
                    await out
        return []

    async def _do(self, action: Action) -> list[int]:
        req = self.req
        match action:
            case SendSegment():
                await self.links.send(1, Segment(req, action.step, action.after, _ids(action.ids),
                                                 _ids(action.parents), _ids(action.positions), _ids(action.tokens)))
            case BroadcastVerdict():
                self.result.verdict_times.append(time.monotonic())  # when decided: the hop to V1 is V1 idle time
                verdict = Verdict(req, action.seq, _ids(action.commit), action.root, action.watermark)
                for k in range(1, self.links.num_stages + 1):
                    await self.links.send(k, verdict)
            case RunDraft(job=job):
                assert self._jobs is not None
                task = self._jobs.create_task(self._draft(job), name=f"draft {req}")
                self._drafts.add(task)
                task.add_done_callback(self._drafts.discard)
            case EmitTokens(tokens=tokens):
                return list(tokens)
            case Finish():
                pass
        return []

    # -- events ------------------------------------------------------------------------------------------
    async def _next_event(self) -> Event | None:
        sched = self.sched
        if sched.idle and self.inbox.items.empty():
            raise LocalProtocolError(f"scheduler is waiting for nothing ({sched.describe_waiting()})")
        try:
            async with timeout(self.step_timeout):
                item = await self.inbox.items.get()
        except TIMEOUT_ERRORS:
            return StepTimedOut(self.step_timeout)
        if isinstance(item, DraftFailed):
            self._draft_error = item.error
            return DraftError(repr(item.error))
        return await self._to_event(item)

    async def _to_event(self, item: Message | Event) -> Event | None:
        match item:
            case Prefill(last=True, x=x) if self.sched.state is RequestState.PREFILLING:
                logits = await self._logits(x)
                return Prefilled(logits[-1])
            case Segment(step=step, ids=ids, x=x):
                id_list = ids.tolist()
                live = self.sched.live_rows(id_list)
                logits = await self._logits(x[live]) if live else torch.zeros(0, 1)
                return SegmentReturned(step, tuple(id_list[i] for i in live), logits)
            case Prefill():
                return None
            case DraftReady() | StageLost() | StageError():
                return item  # put by a reader or a draft task
        raise LocalProtocolError(f"unexpected {type(item).__name__} for request {self.req}")

    async def _compute(self, work: Work, fn: Callable[..., object], *args: object) -> object:
        out, start, end = await self.backend.run(work, fn, *args)
        self.result.head_busy.append((start, end, work.kind.value))
        return out

    async def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        out = await self._compute(Work(WorkKind.LM_HEAD, rows=hidden.shape[0]), self.lm_head.forward, hidden)
        assert isinstance(out, torch.Tensor)
        return out

    async def _draft(self, job: DraftJob) -> None:
        """Drive a draft job one tree level per compute job, so a returned segment's lm_head and verification
        run between levels instead of waiting for the whole expansion (the head is the pipeline's bottleneck
        when drafting is slow). A job whose anchor died meanwhile is abandoned."""
        drafter = self.drafter
        assert drafter is not None

        def start() -> None:
            drafter.sync(job.context)
            drafter.begin_job()

        try:
            await self._compute(Work(WorkKind.DRAFT_SYNC, rows=0), start)
            while (request := job.next_request()) is not None:
                if not self.sched.draft_useful(job):
                    job.abandon()
                    break
                # read on this thread: the compute thread is idle between a job's levels, so the state is settled
                rows = drafter.rows_to_forward(request.tokens, request.parents)
                args = (list(request.tokens), list(request.parents), list(request.positions))
                if rows or drafter.pending:
                    work = Work(WorkKind.DRAFT_LEVEL, rows=rows, context=drafter.pending)
                    logprobs = await self._compute(work, drafter.expand, *args)
                else:  # every node is known to the drafter: no forward, nothing for the device to do
                    logprobs = drafter.expand(*args)
                assert isinstance(logprobs, torch.Tensor)
                job.feed(logprobs)
        except asyncio.CancelledError:
            self.inbox.items.put_nowait(DraftFailed(RuntimeError("draft job cancelled")))
            raise
        except Exception as exc:  # a drafter bug must fail the request, not leave it waiting for the job
            self.inbox.items.put_nowait(DraftFailed(exc))
            return
        self.inbox.items.put_nowait(DraftReady(job))

    # -- the wire ----------------------------------------------------------------------------------------
    async def _send_prefill(self) -> None:
        prompt = self.prefill
        ids = torch.tensor(prompt, dtype=torch.long)
        size = min(PREFILL_CHUNK, self.links.limits.max_rows)
        chunks = max(1, -(-len(prompt) // size))
        bounds = [round(i * len(prompt) / chunks) for i in range(chunks + 1)]  # nearly equal chunks
        for c in range(chunks):
            a, b = bounds[c], bounds[c + 1]
            await self.links.send(1, Prefill(self.req, c, c == chunks - 1, a, ids[a:b]))

    async def _close(self) -> None:
        """Free the request on every stage and collect their busy intervals (not after a failure: a stage that
        failed or was lost has nothing to report)."""
        try:
            await self.links.send_quietly(Close(self.req))
            if self.links.all_up and self.sched.state is not RequestState.ERROR:
                try:
                    async with timeout(STATS_WAIT_S):
                        await self.inbox.stats_done.wait()
                except TIMEOUT_ERRORS:
                    pass
        finally:
            self.result.busy = dict(self.inbox.stats)
            self.result.stage_memory = dict(self.inbox.memory)
            self.result.finish_reason = self.sched.finish_reason or "cancelled"
            self.result.stats = self.sched.stats
            self.result.bytes_sent += self.inbox.bytes_sent
            self.links.close_inbox(self.req)


def _ids(values: Sequence[int]) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.long)
