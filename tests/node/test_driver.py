"""The head's shell in memory: RequestDriver and HeadNode over FakeStages, no socket, process or model.

Each test runs in milliseconds: the shell's cancellation at each await point, a lost link during recovery, a
second cancel during close, the 3.10 timeout class, a stage that answers garbage, and failures that become
scheduler events.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from flowspec.compat import BaseExceptionGroup, timeout
from flowspec.errors import ModelError, PeerProtocolError, StageFailed, StageTimeout
from flowspec.net import Segment
from flowspec.node import driver as driver_module
from flowspec.node.backend import Backend
from flowspec.node.driver import GenerationResult, RequestDriver
from flowspec.node.head import HeadNode
from flowspec.node.links import LinkLost
from flowspec.sched import Budget, Mode, RequestState, SamplingParams, Scheduler
from tests.node.fakes import CountingDrafter, CountingHead, FakeStages, Script, counting_answer

PROMPT = [1, 2, 3]
BUDGETS = {
    "ar": Budget(Mode.AR, 2),
    "flowspec": Budget(Mode.FLOWSPEC, 2, init_tokens=4, topk=2, depth=1, expand_tokens=2, expand_depth=1, segment=2),
}


@pytest.fixture
async def backend() -> AsyncIterator[Backend]:
    b = Backend()
    yield b
    await b.aclose()


def make_driver(links: FakeStages, backend: Backend, mode: str = "ar", n: int = 6, step_timeout: float = 5.0,
                **draft: object) -> RequestDriver:
    budget = BUDGETS[mode]
    sched = Scheduler(PROMPT, budget, SamplingParams(), max_new_tokens=n)
    drafter = CountingDrafter(**draft).new_state() if budget.mode is not Mode.AR else None
    return RequestDriver(sched, PROMPT, links, CountingHead(), drafter, backend, GenerationResult(), step_timeout)


@pytest.mark.parametrize("mode", ["ar", "flowspec"])
async def test_a_request_runs_to_its_answer_and_closes_on_every_stage(backend: Backend, mode: str) -> None:
    links = FakeStages(3)
    driver = make_driver(links, backend, mode)
    got: list[int] = []
    await driver.run([], got.extend)
    assert got == counting_answer(PROMPT[-1], 6)
    assert driver.sched.state is RequestState.DONE and driver.result.finish_reason == "length"
    assert links.closed(driver.req) and links.open_requests == 0
    assert set(driver.result.busy) == {1, 2, 3}  # every stage's stats were collected


# -- cancellation at each await point -------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["open", "prefill", "segment", "verdict"])
async def test_cancelled_at_each_await_the_request_is_closed_on_every_stage(backend: Backend, where: str) -> None:
    gate = asyncio.Event()
    links = FakeStages(2, Script(gates={where: gate}))
    driver = make_driver(links, backend)
    task = asyncio.create_task(driver.run([], lambda tokens: None))
    await wait_reached(links, where)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert driver.sched.state is RequestState.DONE and driver.sched.finish_reason == "cancelled"
    assert links.closed(driver.req) and links.open_requests == 0


async def test_cancelled_while_the_lm_head_runs(backend: Backend) -> None:
    started, release = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()

    class SlowHead(CountingHead):
        def forward(self, hidden):  # type: ignore[no-untyped-def]
            loop.call_soon_threadsafe(started.set)
            asyncio.run_coroutine_threadsafe(release.wait(), loop).result(5)
            return super().forward(hidden)

    links = FakeStages(2)
    driver = make_driver(links, backend)
    driver.lm_head = SlowHead()
    task = asyncio.create_task(driver.run([], lambda tokens: None))
    await asyncio.wait_for(started.wait(), 5)
    task.cancel()
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert links.closed(driver.req)


async def test_cancelled_while_a_draft_job_runs(backend: Backend) -> None:
    gate = asyncio.Event()
    links = FakeStages(2, Script(gates={"segment": gate}))  # flowspec waits with its first tree drafted
    driver = make_driver(links, backend, "flowspec")
    task = asyncio.create_task(driver.run([], lambda tokens: None))
    await wait_reached(links, "segment")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert links.closed(driver.req) and not driver._drafts


async def test_a_second_cancel_during_the_close_still_closes_and_still_cancels(backend: Backend) -> None:
    gate = asyncio.Event()
    links = FakeStages(2, Script(gates={"close": gate}))
    driver = make_driver(links, backend)
    task = asyncio.create_task(driver.run([], lambda tokens: None))
    await wait_reached(links, "close")  # the request ran to its end; its close waits at the gate
    task.cancel()
    await asyncio.sleep(0)
    task.cancel()
    await asyncio.sleep(0)
    assert not task.done()  # the close is not abandoned
    gate.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert links.closed(driver.req) and links.open_requests == 0


async def test_the_head_keeps_a_cancel_that_comes_while_it_waits_for_its_driver(backend: Backend) -> None:
    """A consumer that stops early closes the stream; a cancel that arrives while the head waits for the
    driver's close must still cancel the consumer (suppressing CancelledError there swallowed it)."""
    gate = asyncio.Event()
    links = FakeStages(2, Script(gates={"close": gate}))
    head = HeadNode(CountingHead(), links, backend=backend)  # type: ignore[arg-type]

    async def consume() -> str:
        stream = head.generate(PROMPT, BUDGETS["ar"], SamplingParams(), 50)
        async with contextlib.aclosing(stream) as tokens:
            async for _ in tokens:
                break  # stop early: the driver is cancelled and closes the request
        return "returned normally"

    task = asyncio.create_task(consume())
    await wait_reached(links, "close")
    task.cancel()
    await asyncio.sleep(0.01)
    gate.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert links.open_requests == 0


# -- failures are events ----------------------------------------------------------------------------------------
async def test_a_stalled_pipeline_is_a_step_timeout_not_a_group(backend: Backend) -> None:
    links = FakeStages(2, Script(on_segment=lambda segment: None))  # segments never come back
    driver = make_driver(links, backend, step_timeout=0.05)
    with pytest.raises(StageTimeout, match=r"no progress for 0 s: a stage is stalled .*segments in flight: \[1\]"):
        await driver.run([], lambda tokens: None)
    assert driver.sched.state is RequestState.ERROR and links.closed(driver.req)


async def test_the_step_timeout_as_python_3_10_raises_it(backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """On 3.10 an expired async_timeout raises asyncio.TimeoutError, another class than TimeoutError: the
    driver must read it as a timeout all the same."""
    class AsyncioTimeoutError(Exception):  # what asyncio.TimeoutError is on 3.10: not a TimeoutError
        pass

    @contextlib.asynccontextmanager
    async def timeout_310(delay: float | None) -> AsyncIterator[None]:
        try:
            async with timeout(delay):
                yield
        except TimeoutError:
            raise AsyncioTimeoutError from None

    monkeypatch.setattr(driver_module, "timeout", timeout_310)
    monkeypatch.setattr(driver_module, "TIMEOUT_ERRORS", (TimeoutError, AsyncioTimeoutError))
    links = FakeStages(2, Script(on_segment=lambda segment: None))
    driver = make_driver(links, backend, step_timeout=0.05)
    with pytest.raises(StageTimeout):
        await driver.run([], lambda tokens: None)


async def test_a_failing_drafter_fails_the_request_with_its_cause(backend: Backend) -> None:
    links = FakeStages(2)
    driver = make_driver(links, backend, "flowspec", fail_at=1)
    with pytest.raises(ModelError, match="the drafter failed: RuntimeError") as failure:
        await driver.run([], lambda tokens: None)
    assert isinstance(failure.value.__cause__, RuntimeError)
    assert driver.sched.state is RequestState.ERROR and links.closed(driver.req)


async def test_a_stage_error_frame_fails_the_request_and_a_lost_link_asks_for_recovery(backend: Backend) -> None:
    from flowspec.sched import StageError

    links = FakeStages(2, Script(on_segment=lambda s: StageError(2, "compute", "out of memory")))  # type: ignore[arg-type,return-value]
    with pytest.raises(StageFailed, match="stage 2 reported compute: out of memory"):
        await make_driver(links, backend).run([], lambda tokens: None)
    links = FakeStages(2)
    links.lose_on_send.add("verdict")
    with pytest.raises(LinkLost) as lost:
        await make_driver(links, backend).run([], lambda tokens: None)
    assert lost.value.stage == 1


async def test_a_stage_that_answers_garbage_fails_the_request_and_says_so(backend: Backend) -> None:
    """A returned segment the ledger contradicts (a step never sent) is the stage's fault, not ours."""
    def garbage(s: Segment) -> Segment:
        return Segment(s.req, s.step + 40, s.after, s.ids, s.parents, s.pos, torch_hidden(s))

    links = FakeStages(2, Script(on_segment=garbage))
    driver = make_driver(links, backend)
    with pytest.raises(BaseExceptionGroup) as group:
        await driver.run([], lambda tokens: None)
    assert group.group_contains(PeerProtocolError, match="not in flight")  # flowspec.api unwraps this group
    assert driver.sched.state is RequestState.ERROR and links.closed(driver.req)


# -- recovery ---------------------------------------------------------------------------------------------------
async def test_a_lost_stage_is_recovered_and_the_request_resumes_exactly(backend: Backend) -> None:
    links = FakeStages(2)
    head = HeadNode(CountingHead(), links, backend=backend)  # type: ignore[arg-type]
    got: list[int] = []
    losses = iter([True, False, False, False, False, False])
    original = links.script.on_segment

    def lose_once(s: Segment) -> object:
        if next(losses, False):
            links.lose(2)
            return None
        return original(s)

    links.script.on_segment = lose_once  # type: ignore[assignment]
    async with contextlib.aclosing(head.generate(PROMPT, BUDGETS["ar"], SamplingParams(), 6)) as tokens:
        async for new in tokens:
            got.extend(new)
    assert got == counting_answer(PROMPT[-1], 6) and links.recoveries == [2]
    assert len(links.opened()) == 2  # the request was opened again on the recovered pipeline


async def test_a_link_lost_again_during_recovery_fails_with_one_clear_error(backend: Backend) -> None:
    links = FakeStages(2, recovery_ok=False)
    head = HeadNode(CountingHead(), links, backend=backend)  # type: ignore[arg-type]
    links.script.on_segment = lambda s: links.lose(1)  # type: ignore[assignment,func-returns-value]
    with pytest.raises(StageFailed, match="stage 1 lost .*no replacement came"):
        async with contextlib.aclosing(head.generate(PROMPT, BUDGETS["ar"], SamplingParams(), 6)) as tokens:
            async for _ in tokens:
                pass
    assert links.recoveries == [1] and links.open_requests == 0


# -- helpers ----------------------------------------------------------------------------------------------------
async def wait_reached(links: FakeStages, kind: str) -> None:
    reached = links.script.reached.setdefault(kind, asyncio.Event())
    await asyncio.wait_for(reached.wait(), 5)


def torch_hidden(s: Segment):  # type: ignore[no-untyped-def]
    from tests.node.fakes import hidden_of

    return hidden_of(s.x)
