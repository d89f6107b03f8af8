"""A stage whose compute raises (out of memory, a shape bug) fails that request at once, naming the stage and
the exception, without a recovery cycle; the stage keeps its links and serves the next request."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from flowspec.errors import StageFailed
from flowspec.net import Timeouts
from flowspec.node.build import build_head
from flowspec.sched import Budget, Mode, SamplingParams
from tests.faults.test_kv_bound import tiny_llama, tiny_stages


async def test_a_runtime_error_in_a_stage_fails_the_request_within_a_second(tmp_path: Path) -> None:
    dep, peers, nodes, servers = await tiny_stages(tiny_llama(tmp_path / "tiny-llama"), 2, tmp_path / "cache")
    timeouts = Timeouts()
    head = build_head(dep, peers, None, timeouts, step_timeout=30.0, recovery_timeout=30.0)
    await head.connect()
    real_forward = nodes[1].model.forward
    raised_at: list[float] = []

    def broken(x: Any, positions: Any, cache: Any, visible: Any = None) -> Any:
        if positions.numel() == 1 and int(positions[0]) > 8:  # a decode step, after the prompt went through
            raised_at.append(time.monotonic())
            raise RuntimeError("CUDA out of memory (simulated)")
        return real_forward(x, positions, cache, visible)

    budget = Budget(mode=Mode.AR, num_stages=2)
    prompt = list(range(1, 9))
    try:
        nodes[1].model.forward = broken  # type: ignore[method-assign]
        with pytest.raises(StageFailed) as failure:
            async for _ in head.generate(prompt, budget, SamplingParams(), 16):
                pass
        failed_at = time.monotonic()
        message = str(failure.value)
        assert "stage 2" in message and "RuntimeError" in message and "out of memory" in message, message
        assert raised_at and failed_at - raised_at[0] < 1.0, "the head learnt of the failure late"
        assert head.links.all_up, "a compute failure is not a lost link"
        assert not nodes[0].requests and not nodes[1].requests, "the failed request still holds KV somewhere"

        nodes[1].model.forward = real_forward  # type: ignore[method-assign]
        tokens = [t async for chunk in head.generate(prompt, budget, SamplingParams(), 4) for t in chunk]
        assert len(tokens) == 4, "the stage stopped serving after one failed request"
    finally:
        await head.aclose()
        for server in servers:
            server.close()
        for node in nodes:
            await node.aclose()
