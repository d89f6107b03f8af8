"""The head D0: the target's lm_head, the drafter, and requests driven through the stage links.

The parts: `StageLinks` (node/links.py) owns the connections and their recovery; `RequestDriver`
(node/driver.py) is one try at one request around the sans-IO `flowspec.sched.Scheduler`; the `Backend`
(node/backend.py) is the compute thread. `HeadNode.generate` ties them together: it streams a request's
tokens and, when a stage is lost, waits for it (or a standby), then resumes from the committed tokens.

Requests share the head: up to `max_requests` run at once (a stage serves at most `MAX_REQUESTS`), each with its
own driver, scheduler and drafting state over the shared drafter weights and lm_head; their segments interleave
on the stages, which keep one KV cache per request. Requests past the limit wait for a place.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass

import structlog

from flowspec.compat import shielded
from flowspec.config import STEP_TIMEOUT_S
from flowspec.errors import LocalProtocolError, RequestRejected
from flowspec.net import MAX_REQUESTS
from flowspec.node.backend import Backend
from flowspec.node.driver import DrafterLike, DraftStateLike, GenerationResult, LMHeadLike, RequestDriver
from flowspec.node.links import LinkLost, StageLinks
from flowspec.node.probe import line_from, probe_drafter, probe_lm_head
from flowspec.sched import Action, Budget, Mode, SamplingParams, Scheduler
from flowspec.sched.costs import CostModel, Line

__all__ = ["MAX_REQUESTS", "GenerationResult", "HeadNode"]

log = structlog.get_logger("flowspec.head")


@dataclass(frozen=True, slots=True)
class _End:
    error: BaseException | None


class HeadNode:
    def __init__(self, lm_head: LMHeadLike, links: StageLinks, *, drafter: DrafterLike | None = None,
                 step_timeout: float = STEP_TIMEOUT_S, backend: Backend | None = None,
                 max_requests: int = MAX_REQUESTS) -> None:
        self.lm_head, self.links, self.drafter = lm_head, links, drafter
        self.step_timeout = step_timeout  # no progress this long: a stage is stalled (heartbeats still flow)
        self.backend = backend or Backend()
        if not 1 <= max_requests <= MAX_REQUESTS:
            raise LocalProtocolError(f"max_requests {max_requests}: a stage serves 1..{MAX_REQUESTS} at once")
        self.max_requests = max_requests  # requests in flight at once; more wait (a stage refuses past its own)
        self.running = 0  # requests admitted now
        self._waiters: list[asyncio.Future[None]] = []  # requests waiting for a place
        self.lm_head_cost: Line | None = None  # measured at connect (probe_lm_head)
        self.draft_cost: Line | None = None  # measured once a drafter is there (probe_drafter)

    @property
    def waiting(self) -> int:
        """Requests waiting for a place (past `max_requests`)."""
        return len(self._waiters)

    @property
    def num_stages(self) -> int:
        return self.links.num_stages

    async def connect(self) -> None:
        await self.links.connect()
        await self.probe()

    async def probe(self) -> None:
        """Measure what the lm_head and the drafter (if any) cost on this head's backend (for cost_model)."""
        if self.lm_head_cost is None:
            self.lm_head_cost = await probe_lm_head(self.lm_head, self.links.limits.hidden_size, self.backend)
        if self.drafter is not None and self.draft_cost is None:
            self.draft_cost = await probe_drafter(self.drafter, self.backend)

    def cost_model(self) -> CostModel | None:
        """The pipeline's cost curves: the slowest stage's forward (as each stage measured it at start-up and
        announced it in its hello), this head's lm_head and drafter. None until every part was measured."""
        stages = [line_from(link.peer.costs) for link in self.links.links if link.peer.costs]
        if len(stages) < self.num_stages or not stages or self.lm_head_cost is None:
            return None
        stage = Line(max(line.fixed for line in stages), max(line.per_row for line in stages))
        return CostModel(stage=stage, lm_head=self.lm_head_cost, draft=self.draft_cost)

    async def aclose(self) -> None:
        await self.links.aclose()
        await self.backend.aclose()

    def check_request(self, prompt_len: int, max_new_tokens: int) -> None:
        """Refuse, before anything is sent, a request no stage could hold (RequestRejected)."""
        context = self.links.limits.max_positions
        if prompt_len < 1:
            raise RequestRejected("the prompt is empty: give at least one token")
        if max_new_tokens < 1:
            raise RequestRejected(f"max_new_tokens (--max-new-tokens) must be >= 1, got {max_new_tokens}")
        if prompt_len + max_new_tokens >= context:
            raise RequestRejected(
                f"the prompt ({prompt_len} tokens) plus max_new_tokens ({max_new_tokens}) needs "
                f"{prompt_len + max_new_tokens + 1} positions, past the model's context of {context}: shorten "
                f"the prompt or lower max_new_tokens (--max-new-tokens) to at most "
                f"{max(context - 1 - prompt_len, 0)}", code="context_length_exceeded")

    async def generate(self, prompt: Sequence[int], budget: Budget, sampling: SamplingParams,
                       max_new_tokens: int, eos_ids: Sequence[int] = (),
                       result: GenerationResult | None = None) -> AsyncGenerator[list[int], None]:
        """Yield committed tokens as they come. `result` (if given) is filled with tokens and statistics.

        When a stage is lost, the committed tokens are kept: once the stage (or a standby) is back, the request
        is re-opened on every stage, the committed tokens are prefilled again, and decoding resumes where it
        stopped. Without a replacement within the recovery timeout the request fails with StageFailed.
        """
        if not self.links.links:
            raise LocalProtocolError("HeadNode.connect() first")
        if budget.mode is not Mode.AR and self.drafter is None:
            raise LocalProtocolError(f"mode {budget.mode.value} needs a drafter")
        self.check_request(len(prompt), max_new_tokens)
        result = result if result is not None else GenerationResult()
        start = time.monotonic()
        await self._admit()
        try:
            # this request's own drafting state (the drafter's weights are shared); kept across recoveries
            draft = self.drafter.new_state(len(prompt) + max_new_tokens + 64) if budget.mode is not Mode.AR \
                and self.drafter is not None else None
            while True:
                committed = list(prompt) + result.tokens
                generation = self.links.generation
                try:
                    async with contextlib.aclosing(self._attempt(len(prompt), committed, budget, sampling,
                                                                 max_new_tokens, eos_ids, result, draft)) as tries:
                        async for tokens in tries:
                            if not result.tokens:
                                result.ttft_s = time.monotonic() - start
                            result.tokens.extend(tokens)
                            yield tokens
                    return
                except LinkLost as lost:
                    await self.links.recover(lost.stage, lost.reason, generation)
                    result.recoveries += 1
        finally:
            self._leave()
            result.total_s = time.monotonic() - start

    async def _admit(self) -> None:
        """Wait for a place among the `max_requests` running requests (no fixed order among the waiters)."""
        while self.running >= self.max_requests:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                self._waiters.remove(waiter)
        self.running += 1

    def _leave(self) -> None:
        self.running -= 1
        for waiter in self._waiters:  # each checks again; those still over the limit wait on
            if not waiter.done():
                waiter.set_result(None)

    async def _attempt(self, prompt_len: int, committed: list[int], budget: Budget, sampling: SamplingParams,
                       max_new_tokens: int, eos_ids: Sequence[int], result: GenerationResult,
                       draft: DraftStateLike | None) -> AsyncGenerator[list[int], None]:
        """One try on the current links: fresh, or resumed from `committed` after a loss. The driver runs as
        a task of its own (its draft jobs live in its TaskGroup, which must not span a `yield`)."""
        max_context = prompt_len + max_new_tokens + 1
        actions: list[Action] = []
        if len(committed) > prompt_len:
            sched, actions = Scheduler.resume(prompt_len, committed, budget, sampling, max_new_tokens, eos_ids,
                                              max_context)
            prefill = committed[:-1]
        else:
            sched = Scheduler(committed, budget, sampling, max_new_tokens, eos_ids, max_context=max_context)
            prefill = committed
        driver = RequestDriver(sched, prefill, self.links, self.lm_head, draft, self.backend, result,
                               self.step_timeout)
        out: asyncio.Queue[list[int] | _End] = asyncio.Queue()

        async def drive() -> None:
            try:
                await driver.run(actions, out.put_nowait)
            except Exception as exc:
                out.put_nowait(_End(exc))
            else:
                out.put_nowait(_End(None))

        task = asyncio.create_task(drive(), name=f"request {driver.req}")
        try:
            while not isinstance(item := await out.get(), _End):
                yield item
            if item.error is not None:
                raise item.error
        finally:
            task.cancel()
            await shielded(_ended(task))  # the driver's close on every stage runs to its end, cancel or not


async def _ended(task: asyncio.Task[None]) -> None:
    """Wait for `task` to end, however it ends (its outcome went through the queue)."""
    await asyncio.wait([task])
