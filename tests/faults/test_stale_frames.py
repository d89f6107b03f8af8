"""Frames still on the ring when their request ends are dropped, never parked for a later request.

A stage that is paused (SIGSTOP, a swapping Pi) wakes up with the previous stage's frames for a request the head
has already given up on. Those must not wait in the orphan store where a new request could claim them: the stage
remembers finished request ids and drops their late frames, parked frames of a request never opened expire, and
every head draws request ids that another head will not reuse.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from flowspec.config import parse_peers
from flowspec.net import Close, Open, Prefill, Segment, Stats, Timeouts, connect, serve
from flowspec.node import stage as stage_module
from flowspec.node.build import build_head, build_stage, deployment
from flowspec.node.local import free_ports
from tests.faults.test_kv_bound import tiny_llama


async def until(condition, what: str, within: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + within
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, what
        await asyncio.sleep(0.01)


def late_segment(req: int, hidden: int) -> Segment:
    ids = torch.tensor([0, 1])
    return Segment(req, step=3, after=0, ids=ids, parents=torch.tensor([-1, 0]), pos=torch.tensor([3, 4]),
                   x=torch.zeros(2, hidden))


async def test_late_ring_frames_of_a_finished_request_are_dropped(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tiny_llama(tmp_path / "tiny-llama")
    dep = deployment(str(folder), 2, cache_dir=tmp_path / "cache")
    ports = free_ports(3)
    peers = parse_peers("\n".join(f"127.0.0.1:{p}" for p in ports))
    timeouts = Timeouts()
    node = build_stage(dep, peers, 2, None, timeouts)  # the last stage: its ring input is stage 1
    server = await serve("127.0.0.1", ports[2], hello=node.hello, secret=None, limits=node.limits,
                         timeouts=timeouts, on_link=node.on_link)
    hidden = dep.config.hidden_size
    head = await connect("127.0.0.1", ports[2], hello=dep.hello("head", 0), expect_index=2, secret=None,
                         limits=dep.limits(), timeouts=timeouts)
    ring = await connect("127.0.0.1", ports[2], hello=dep.hello("stage", 1), expect_index=2, secret=None,
                         limits=dep.limits(), timeouts=timeouts)
    try:
        req = 4242
        await head.send(Open(req, 64))
        await ring.send(Prefill(req, 0, True, 0, torch.randn(3, hidden)))
        out = await head.recv(timeout_s=10)
        assert isinstance(out, Prefill) and out.req == req and out.x.shape == (1, hidden), out
        await head.send(Close(req))
        assert isinstance(await head.recv(timeout_s=10), Stats)

        # The previous stage's frames that were on their way when the request closed.
        await ring.send(late_segment(req, hidden))
        await ring.send(Prefill(req, 1, True, 3, torch.randn(2, hidden)))
        await until(lambda: req in node.finished, "the stage forgot the closed request")
        await asyncio.sleep(0.2)
        assert not node.orphans and not node.requests, (node.orphans, node.requests)
        assert ring.error is None and head.error is None, "a late frame is not a protocol error"

        # Frames for a request that is never opened are held for a while, then dropped.
        await ring.send(late_segment(77, hidden))
        await until(lambda: 77 in node.orphans, "a frame ahead of its open was not held")
        monkeypatch.setattr(stage_module, "_ORPHAN_TTL_S", 0.0)
        await ring.send(late_segment(78, hidden))
        await until(lambda: 78 in node.orphans, "a frame ahead of its open was not held")
        assert 77 not in node.orphans, "an orphan outlived its time to live"
    finally:
        await head.close()
        await ring.close()
        server.close()
        await node.aclose()


def test_heads_do_not_share_request_ids(tmp_path: Path) -> None:
    folder = tiny_llama(tmp_path / "tiny-llama")
    dep = deployment(str(folder), 2, cache_dir=tmp_path / "cache")
    peers = parse_peers("\n".join(f"127.0.0.1:{p}" for p in free_ports(3)))
    firsts = {build_head(dep, peers, None, Timeouts()).links._next_req for _ in range(4)}
    assert len(firsts) == 4, "two heads would open the same request id on the same stages"
