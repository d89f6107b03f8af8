"""A stage that stalls (its compute stuck, its heartbeats still flowing) fails the request with StageTimeout
after the head's step timeout, and the API hands it over as that one FlowSpecError, never as the
ExceptionGroup the request driver's TaskGroup wraps it in. On Python 3.10 an expired `timeout()` raises
asyncio.TimeoutError, another class than the builtin TimeoutError; the node catches both (flowspec.compat).

In-process pipelines of a tiny random Llama over real TCP on loopback (fast); the real-process cases, with a
SIGSTOPped stage, are in test_stall_cli.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from flowspec import compat
from flowspec.api import _flowspec_errors, _unwrap
from flowspec.compat import BaseExceptionGroup
from flowspec.errors import RequestCancelled, StageFailed, StageTimeout
from flowspec.net import Timeouts
from flowspec.node import driver
from flowspec.node.build import build_head
from flowspec.sched import Budget, Mode, SamplingParams
from tests.faults.test_kv_bound import tiny_llama, tiny_stages

STEP_TIMEOUT = 1.0  # the stalled stage never answers: any step timeout ends the request the same way


class AsyncioTimeoutError(Exception):
    """What asyncio.TimeoutError is on Python 3.10: not a subclass of the builtin TimeoutError."""


@contextlib.asynccontextmanager
async def timeout_as_on_310(delay: float | None) -> AsyncIterator[None]:
    """async_timeout.timeout as Python 3.10 runs it: its own expiry comes out as asyncio.TimeoutError."""
    scope = asyncio.timeout(delay)
    try:
        async with scope:
            yield
    except TimeoutError as exc:
        if scope.expired():
            raise AsyncioTimeoutError from exc
        raise


async def generate_with_a_stalled_stage(tmp_path: Path) -> None:
    """Generate through 2 in-process stages whose stage 2 never finishes a forward (its loop, and so its
    heartbeats, keep running), with the API's exception map around the head's stream."""
    dep, peers, nodes, servers = await tiny_stages(tiny_llama(tmp_path / "tiny-llama"), 2, tmp_path / "cache")
    timeouts = Timeouts()
    head = build_head(dep, peers, None, timeouts, step_timeout=STEP_TIMEOUT, recovery_timeout=30.0)
    release = threading.Event()

    def stuck(*args: Any) -> Any:
        release.wait(60)  # on the stage's compute thread
        raise RuntimeError("released")

    try:
        await head.connect()
        nodes[1].model.forward = stuck  # type: ignore[method-assign]
        with _flowspec_errors():
            async for _ in head.generate(list(range(1, 9)), Budget(mode=Mode.AR, num_stages=2), SamplingParams(), 8):
                pass
    finally:
        release.set()
        await head.aclose()
        for server in servers:
            server.close()
        for node in nodes:
            await node.aclose()


async def test_a_stalled_stage_is_one_stage_timeout(tmp_path: Path) -> None:
    with pytest.raises(StageTimeout, match=r"no progress for 1 s: a stage is stalled") as failure:
        await generate_with_a_stalled_stage(tmp_path)
    assert not isinstance(failure.value, BaseExceptionGroup)


@pytest.mark.skipif(sys.version_info < (3, 11), reason="on 3.10 the test above runs the real thing")
async def test_a_stalled_stage_is_one_stage_timeout_with_python_310s_timeout_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the node as it runs on 3.10: compat's tuple holds asyncio.TimeoutError, which its timeout() raises
    monkeypatch.setattr(driver, "TIMEOUT_ERRORS", (TimeoutError, AsyncioTimeoutError))
    monkeypatch.setattr(driver, "timeout", timeout_as_on_310)
    with pytest.raises(StageTimeout, match=r"no progress for 1 s: a stage is stalled"):
        await generate_with_a_stalled_stage(tmp_path)


def test_compat_catches_both_timeout_classes() -> None:
    assert TimeoutError in compat.TIMEOUT_ERRORS and asyncio.TimeoutError in compat.TIMEOUT_ERRORS


def test_a_group_of_flowspec_errors_becomes_its_first_meaningful_one_with_the_rest_as_notes() -> None:
    cause = OSError("connection reset")
    timeout = StageTimeout("no progress")
    timeout.__cause__ = cause
    group = BaseExceptionGroup("unhandled errors in a TaskGroup", [
        RequestCancelled("cancelled"), BaseExceptionGroup("inner", [timeout, StageFailed("stage 2 lost")])])
    with pytest.raises(StageTimeout) as raised:
        with _flowspec_errors():
            raise group
    assert raised.value is timeout and raised.value.__cause__ is cause  # its own cause, not the group
    assert timeout.__notes__ == ["also: RequestCancelled: cancelled", "also: StageFailed: stage 2 lost"]


def test_a_group_holding_anything_else_propagates_as_it_is() -> None:
    bug = BaseExceptionGroup("unhandled errors in a TaskGroup", [StageTimeout("no progress"), KeyError("bug")])
    assert _unwrap(bug) is None
    with pytest.raises(BaseExceptionGroup) as raised:
        with _flowspec_errors():
            raise bug
    assert raised.value is bug
