"""The emulated testbed behind the product's one seam: work paced to a profile × D on the compute thread,
overruns counted per kind and never hidden, ring hops shaped and charged at the profiled model's size."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
import torch

from flowspec.bench.profiles import load_profile
from flowspec.bench.shaping import LinkShape
from flowspec.bench.testbed import EmulatedBackend, ShapedNetwork, work_cost
from flowspec.net import Hello, Limits, Link, Segment, Timeouts, connect, serve
from flowspec.node.backend import Backend, Work, WorkKind

JETSON = load_profile("jetson-7b")
PI = load_profile("pi5-8b")


def _hello(role: str, index: int) -> Hello:
    return Hello(version=1, role=role, index=index, fingerprint="fp", nonce=bytes(16))


async def _timed(backend: Backend, work: Work, delay: float = 0.0) -> tuple[float, float, float]:
    """Run a fake job that takes `delay` s; return (wall time, start, end) as the backend reports them."""
    t = time.monotonic()
    _, start, end = await backend.run(work, time.sleep, delay)
    return time.monotonic() - t, start, end


async def test_stage_cost_replay_matches_profile() -> None:
    dilation = 2.0  # t(k)·D of 120-146 ms: sleep jitter of a loaded 2-core machine stays within a few %
    backend = EmulatedBackend(JETSON, dilation, num_stages=2)
    for k in (1, 4, 16, 64):
        durations = []
        for _ in range(3):
            took, start, end = await _timed(backend, Work(WorkKind.STAGE_FORWARD, rows=k, context=10))
            durations.append(took)
            assert end == pytest.approx(start + JETSON.stage_cost(k, 10) * dilation)
        expected = JETSON.stage_cost(k, 10) * dilation
        assert min(durations) >= expected * 0.999
        assert sorted(durations)[1] == pytest.approx(expected, rel=0.05)
    report = backend.report()
    assert report["overruns"] == 0 and report["paced_steps"] == 12
    await backend.aclose()


async def test_slow_compute_is_an_overrun_per_kind_and_not_hidden() -> None:
    backend = EmulatedBackend(JETSON, 0.1, num_stages=2)  # lm_head budget ~0.5 ms
    took, start, end = await _timed(backend, Work(WorkKind.LM_HEAD, rows=4), delay=0.02)
    assert end - start >= 0.02 and took < 0.2  # the step takes the real time, no extra wait
    await _timed(backend, Work(WorkKind.STAGE_FORWARD, rows=4))
    assert backend.ledger.overruns == {"lm_head": 1}
    assert backend.ledger.worst_ratio > 1
    report = backend.report()
    assert report["overruns"] == 1 and report["overruns_by_kind"] == {"lm_head": 1}
    assert backend.report()["overruns"] == 0  # reports are deltas since the last one
    await backend.aclose()


async def test_the_product_backend_does_not_pace() -> None:
    backend = Backend()
    took, start, end = await _timed(backend, Work(WorkKind.STAGE_FORWARD, rows=64, context=1000))
    assert took < 0.05 and end - start < 0.05
    await backend.aclose()


def test_head_work_costs_lm_head_and_draft_levels() -> None:
    assert work_cost(PI, Work(WorkKind.LM_HEAD, rows=4)) == PI.head_step_cost(4)
    assert work_cost(PI, Work(WorkKind.DRAFT_SYNC, rows=0)) == PI.tree_build
    # the pending context rides in the level's forward: its per-token part only
    with_context = work_cost(PI, Work(WorkKind.DRAFT_LEVEL, rows=2, context=3))
    assert with_context == pytest.approx(PI.draft_level_cost(2) + PI.draft_context_cost(3) - PI.draft_level_cost(0))
    assert work_cost(PI, Work(WorkKind.DRAFT_LEVEL, rows=1)) == PI.draft_level_cost(1)


async def test_one_compute_thread_serializes_the_head_device() -> None:
    backend = EmulatedBackend(PI, 0.2, num_stages=2)
    t = time.monotonic()
    await asyncio.gather(backend.run(Work(WorkKind.LM_HEAD, rows=4), lambda: None),
                         backend.run(Work(WorkKind.DRAFT_LEVEL, rows=3), lambda: None))
    expected = (PI.head_step_cost(4) + PI.draft_level_cost(3)) * 0.2
    assert time.monotonic() - t >= expected * 0.999  # one device: the two jobs did not overlap
    assert [kind for *_, kind in backend.busy] == ["lm_head", "draft"]
    await backend.aclose()


async def test_verification_goes_before_queued_draft_levels() -> None:
    """A returned segment's lm_head waits for the draft level that is running, never for one queued after it."""
    backend = EmulatedBackend(PI, 1.0, num_stages=2)  # a level takes 57 ms
    running = asyncio.ensure_future(backend.run(Work(WorkKind.DRAFT_LEVEL, rows=1), lambda: None))
    await asyncio.sleep(0.01)  # the first level is on the compute thread now
    queued = asyncio.ensure_future(backend.run(Work(WorkKind.DRAFT_LEVEL, rows=2), lambda: None))
    await asyncio.sleep(0)
    verify = asyncio.ensure_future(backend.run(Work(WorkKind.LM_HEAD, rows=4), lambda: None))
    await asyncio.gather(running, queued, verify)
    assert [kind for *_, kind in backend.busy] == ["draft", "lm_head", "draft"]
    await backend.aclose()
    with pytest.raises(RuntimeError, match="closed"):
        await backend.run(Work(WorkKind.LM_HEAD, rows=1), lambda: None)


def test_only_ring_hops_are_shaped() -> None:
    net = ShapedNetwork(JETSON, LinkShape(0.001, 1e8), num_stages=3)
    head, v1, v2, v3 = _hello("head", 0), _hello("stage", 1), _hello("stage", 2), _hello("stage", 3)
    assert net.is_ring_hop(head, v1) and not net.is_ring_hop(head, v2)
    assert net.is_ring_hop(v1, v2) and net.is_ring_hop(v2, v3) and net.is_ring_hop(v3, head)
    assert not net.is_ring_hop(v2, head) and not net.is_ring_hop(v2, v1)


async def test_links_charge_profiled_bytes_and_count_real_ones(tmp_path: Path) -> None:
    limits = Limits.for_model(hidden_size=64, vocab_size=100, max_positions=512, max_rows=32)
    timeouts = Timeouts(heartbeat_interval=10.0, heartbeat_timeout=30.0)
    got: asyncio.Queue[object] = asyncio.Queue()

    async def sink(link: Link) -> None:
        while True:
            got.put_nowait(await link.recv())

    stats = tmp_path / "head.jsonl"
    backend = EmulatedBackend(JETSON, 1.0, num_stages=2, link=LinkShape(0.0, 1e9), name="head",
                              stats_file=str(stats))
    server = await serve("127.0.0.1", 0, hello=_hello("stage", 1), secret=None, limits=limits,
                         timeouts=timeouts, on_link=sink)
    port = server.sockets[0].getsockname()[1]
    link = await connect("127.0.0.1", port, hello=_hello("head", 0), expect_index=1, secret=None, limits=limits,
                         timeouts=timeouts, network=backend.network)
    ar = torch.arange(8)
    await link.send(Segment(1, 1, 0, ar, ar - 1, ar, torch.zeros(8, 64)))
    await asyncio.wait_for(got.get(), 5)
    assert backend.shaped.bytes_charged == 8 * (4096 * 2 + 24) + 64
    assert backend.shaped.bytes_real == link.bytes_sent
    assert 8 * 64 * 4 < link.bytes_sent < 8 * 64 * 4 + 400  # the real frame: 8 fp32 rows of 64 + indices
    backend.request_closed(7)
    line = json.loads(stats.read_text())
    assert line["req"] == 7 and line["bytes_charged"] == 8 * (4096 * 2 + 24) + 64 and line["node"] == "head"
    await link.close()
    server.close()
    await server.wait_closed()
    await backend.aclose()
