"""Cost replay: an emulated stage/head paced to a profile takes t(k)·D, counts overruns, charges link bytes."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from flowspec.model.profiles import load_profile, make_charge_bytes
from flowspec.net import Hello, Limits, Link, Segment, Timeouts, connect, serve
from flowspec.node.pacer import HeadDevice, Pacer

JETSON = load_profile("jetson-7b")


async def test_stage_cost_replay_matches_profile() -> None:
    dilation = 2.0  # t(k)·D of 120-146 ms: sleep jitter of a loaded 2-core machine stays within a few %
    pacer = Pacer(JETSON.stage_cost, dilation, context_aware=True)
    for k in (1, 4, 16, 64):
        durations = []
        for _ in range(3):
            start = time.monotonic()
            end = await pacer.pace(k, start, time.monotonic())  # a no-op "model"
            durations.append(time.monotonic() - start)
            assert end == pytest.approx(start + JETSON.stage_cost(k) * dilation)
        expected = JETSON.stage_cost(k) * dilation
        assert min(durations) >= expected * 0.999
        assert sorted(durations)[1] == pytest.approx(expected, rel=0.05)
    assert pacer.overruns == 0 and pacer.steps == 12


async def test_slow_compute_is_an_overrun_and_not_hidden() -> None:
    pacer = Pacer(JETSON.stage_cost, 0.1)  # budget ~6 ms
    start = time.monotonic()
    await asyncio.sleep(0.02)  # the "real compute" takes 20 ms
    end = time.monotonic()
    assert await pacer.pace(4, start, end) == end  # the step takes the real time
    assert pacer.overruns == 1 and pacer.worst_ratio > 1
    start = time.monotonic()
    await pacer.pace(4, start, start)
    assert pacer.overruns == 1 and pacer.steps == 2


def test_no_profile_no_pacing() -> None:
    pacer = Pacer()
    assert asyncio.run(pacer.pace(3, 1.0, 2.0)) == 2.0 and pacer.steps == 0


class _FakeHead:
    def __init__(self, delay: float) -> None:
        self.delay = delay

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        time.sleep(self.delay)
        return hidden


class _FakeDrafter:
    """Lazy like the real Drafter: sync records the context, the next expand forwards it (`pending`)."""

    def __init__(self) -> None:
        self.context: list[int] = []
        self.computed = 0

    @property
    def pending(self) -> int:
        return len(self.context) - self.computed

    def sync(self, committed: list[int]) -> None:
        self.context = list(committed)

    def expand(self, tokens: list[int], parents: list[int], positions: list[int]) -> torch.Tensor:
        self.computed = len(self.context)
        return torch.zeros(len(tokens), 4)


def _close(took: float, expected: float) -> None:
    assert expected * 0.999 <= took < expected + 0.03  # never early; late only by scheduler jitter


def test_head_device_charges_lm_head_and_draft_levels() -> None:
    pi = load_profile("pi5-8b")
    dev = HeadDevice(pi, 0.2)
    head = dev.lm_head(_FakeHead(0.0))
    t = time.monotonic()
    head.forward(torch.zeros(4, 8))
    _close(time.monotonic() - t, pi.head_step_cost(4) * 0.2)
    drafter = dev.drafter(_FakeDrafter())
    t = time.monotonic()
    drafter.sync([1, 2, 3])  # 3 new tokens, forwarded lazily: only the tree bookkeeping now
    _close(time.monotonic() - t, pi.tree_build * 0.2)
    t = time.monotonic()
    drafter.expand([5, 6], [-1, 0], [3, 4])  # one forward of 3 context + 2 scratch rows
    _close(time.monotonic() - t, (pi.draft_level_cost(2) + pi.draft_context_cost(3) - pi.draft_level_cost(0)) * 0.2)
    t = time.monotonic()
    drafter.expand([7], [1], [5])  # nothing pending any more: a plain level
    _close(time.monotonic() - t, pi.draft_level_cost(1) * 0.2)
    assert [kind for *_, kind in dev.busy] == ["lm_head", "draft", "draft", "draft"]
    assert dev.pacer.overruns == 0
    slow = dev.lm_head(_FakeHead(0.05))  # 50 ms real vs 7.9 ms budget
    slow.forward(torch.zeros(1, 8))
    assert dev.pacer.overruns == 1


async def test_links_charge_profiled_bytes_and_count_real_ones() -> None:
    limits = Limits.for_model(hidden_size=64, vocab_size=100, max_positions=512, max_rows=32)
    timeouts = Timeouts(heartbeat_interval=10.0, heartbeat_timeout=30.0)
    stage = Hello(version=1, role="stage", index=1, fingerprint="fp", nonce=bytes(16))
    head = Hello(version=1, role="head", index=0, fingerprint="fp", nonce=bytes(16))
    got: asyncio.Queue[object] = asyncio.Queue()

    async def sink(link: Link) -> None:
        while True:
            got.put_nowait(await link.recv())

    server = await serve("127.0.0.1", 0, hello=stage, secret=None, limits=limits, timeouts=timeouts, on_link=sink)
    port = server.sockets[0].getsockname()[1]
    link = await connect("127.0.0.1", port, hello=head, expect_index=1, secret=None, limits=limits,
                         timeouts=timeouts, charge_bytes=make_charge_bytes(JETSON))
    ar = torch.arange(8)
    await link.send(Segment(1, 1, 0, ar, ar - 1, ar, torch.zeros(8, 64)))
    await asyncio.wait_for(got.get(), 5)
    assert link.bytes_charged == 8 * (4096 * 2 + 24) + 64
    assert 8 * 64 * 4 < link.bytes_sent < 8 * 64 * 4 + 400  # the real frame: 8 fp32 rows of 64 + indices
    await link.close()
    server.close()
    await server.wait_closed()
