"""A stage dies or stalls mid-generation: the request resumes with the same tokens (restarted stage or a
standby), or fails within the configured bound with an error that names the stage, and the surviving stages
free the request's state."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from flowspec.api import Request
from flowspec.errors import StageFailed, StageTimeout
from flowspec.net import Timeouts
from flowspec.node.head import GenerationResult
from tests.faults.conftest import NEW, PROMPT, Pipeline, log_events

pytestmark = pytest.mark.slow

KILL_AFTER = 8  # committed tokens before the fault is injected


async def run_with_fault(pipe: Pipeline, request: Request, fault, **head_kw) -> tuple[GenerationResult, dict]:  # type: ignore[no-untyped-def]
    """Stream `request`; once KILL_AFTER tokens are in, call `fault()`; note when the next tokens arrive."""
    cluster = await pipe.head(**head_kw)
    result = GenerationResult()
    times: dict[str, float] = {}
    try:
        async for tokens in cluster.stream_tokens(PROMPT, request, result):
            if "fault" not in times and len(result.tokens) >= KILL_AFTER:
                times["fault"] = time.monotonic()
                fault()
            elif "fault" in times and "resumed" not in times:
                times["resumed"] = time.monotonic()
    finally:
        times["end"] = time.monotonic()
        await cluster.aclose()
    return result, times


@pytest.mark.parametrize("request_", [
    Request(mode="flowspec", max_new_tokens=NEW),
    Request(mode="ar", max_new_tokens=24, temperature=0.8, top_p=0.95, seed=11),
], ids=["flowspec-greedy", "ar-sampled"])
async def test_kill9_middle_stage_and_restart_gives_the_same_tokens(pipe: Pipeline, request_: Request) -> None:
    reference = await pipe.reference(request_)
    loop = asyncio.get_running_loop()

    def fault() -> None:
        pipe.local.kill_stage(2, signal.SIGKILL)
        loop.call_later(1.0, pipe.local.start_stage, 2)  # back after 1 s (it then loads its shard)

    result, times = await run_with_fault(pipe, request_, fault)
    assert result.tokens == reference
    assert result.recoveries == 1
    print(f"\n[faults] kill -9 stage 2 + restart ({request_.mode}): next token "
          f"{times['resumed'] - times['fault']:.2f} s after the kill")
    pipe.wait_ready(2)


async def test_concurrent_requests_recover_together_with_the_same_tokens(pipe: Pipeline) -> None:
    """Two requests in flight lose stage 2 at once: one recovery brings it back (not one per request, each
    closing the other's fresh link), and both resume with their fault-free tokens."""
    requests = [Request(mode="flowspec", max_new_tokens=NEW),
                Request(mode="ar", max_new_tokens=24, temperature=0.8, top_p=0.95, seed=11)]
    references = [await pipe.reference(r) for r in requests]
    loop = asyncio.get_running_loop()
    cluster = await pipe.head()
    killed = asyncio.Event()

    async def one(request: Request, trigger: bool) -> GenerationResult:
        result = GenerationResult()
        async for _ in cluster.stream_tokens(PROMPT, request, result):
            if trigger and not killed.is_set() and len(result.tokens) >= KILL_AFTER:
                killed.set()
                pipe.local.kill_stage(2, signal.SIGKILL)
                loop.call_later(1.0, pipe.local.start_stage, 2)
        return result

    try:
        results = await asyncio.gather(one(requests[0], True), one(requests[1], False))
        generation = cluster.head.links.generation
    finally:
        await cluster.aclose()
    assert [r.tokens for r in results] == references
    assert generation == 1, f"{generation} recoveries for one lost stage"
    pipe.wait_ready(2)


async def test_standby_takes_over_a_killed_stage(pipe: Pipeline) -> None:
    request = Request(mode="flowspec", max_new_tokens=NEW)
    reference = await pipe.reference(request)
    pipe.start_standby()
    try:
        result, times = await run_with_fault(pipe, request, lambda: pipe.local.kill_stage(2, signal.SIGKILL))
        assert result.tokens == reference
        assert result.recoveries == 1
        served = [e for e in log_events(pipe.standby_log) if e.get("event") == "request.open"]
        assert served, "the standby never saw the request"
        print(f"\n[faults] standby: next token {times['resumed'] - times['fault']:.2f} s after the kill")
    finally:
        pipe.restart(2)
        pipe.stop_standby()


async def test_sigstop_is_detected_within_the_heartbeat_timeout(pipe: Pipeline) -> None:
    timeouts = Timeouts(heartbeat_interval=0.25, heartbeat_timeout=1.0)
    stopped = {"at": 0.0}

    def fault() -> None:
        stopped["at"] = time.monotonic()
        os.kill(pipe.pid(2), signal.SIGSTOP)

    try:
        with pytest.raises((StageFailed, StageTimeout)) as info:
            await run_with_fault(pipe, Request(mode="flowspec", max_new_tokens=NEW), fault,
                                 timeouts=timeouts, recovery_timeout=0)
        detected = time.monotonic() - stopped["at"]
    finally:
        os.kill(pipe.pid(2), signal.SIGCONT)
    assert stopped["at"], "the request ended before the fault"
    assert "stage 2" in str(info.value), info.value
    assert detected < 1.0 + 4.0, f"a stopped stage took {detected:.2f} s to detect (heartbeat timeout 1 s)"
    print(f"\n[faults] SIGSTOP stage 2: {type(info.value).__name__} after {detected:.2f} s: {info.value}")
    # the stage serves again once it runs: a new request on a fresh head completes
    cluster = await pipe.head()
    try:
        result = await cluster.generate(PROMPT, Request(mode="ar", max_new_tokens=4))
    finally:
        await cluster.aclose()
    assert result.tokens == (await pipe.reference(Request(mode="flowspec", max_new_tokens=NEW)))[:4]


def _unfreed(events: list[dict]) -> int:
    """Requests a stage opened and has not freed (closed by the head, failed, or orphaned by a lost head)."""
    opened = sum(e.get("event") == "request.open" for e in events)
    freed = sum(e.get("event") in ("request.closed", "request.failed", "request.orphaned") for e in events)
    return opened - freed


async def test_lost_stage_without_replacement_fails_within_the_recovery_timeout(pipe: Pipeline) -> None:
    killed = {"at": 0.0}

    def fault() -> None:
        killed["at"] = time.monotonic()
        pipe.local.kill_stage(2, signal.SIGKILL)

    cluster = await pipe.head(recovery_timeout=2.0)
    try:
        with pytest.raises(StageFailed) as info:
            async for _ in cluster.stream_tokens(PROMPT, Request(mode="flowspec", max_new_tokens=NEW)):
                if not killed["at"]:
                    fault()
        failed_after = time.monotonic() - killed["at"]
        assert "stage 2" in str(info.value) and "no replacement" in str(info.value), info.value
        assert 1.5 < failed_after < 2.0 + 5.0, f"failed {failed_after:.2f} s after the kill (recovery timeout 2 s)"
        print(f"\n[faults] no replacement: StageFailed {failed_after:.2f} s after the kill: {info.value}")
        # Before this head goes away: the surviving stages already freed the request (the head closed it).
        deadline = time.monotonic() + 10.0
        while True:
            left = {k: _unfreed(log_events(pipe.local.logs[k])) for k in (1, 3)}
            if not any(left.values()) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        assert left == {1: 0, 3: 0}, f"requests still held by surviving stages: {left}"
    finally:
        await cluster.aclose()
        pipe.restart(2)
