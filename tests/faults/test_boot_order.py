"""Boxes come up in any order, and a request that can never succeed fails once, clearly, at once.

In-process pipelines of a tiny random Llama (real TCP on loopback): the head waits, with backoff, for a stage
that starts late; a stage that answers but runs another split is refused at once; a request longer than the
context is refused before anything is sent; a stage that refuses a request answers with an Error frame for that
request and keeps its link.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from flowspec.config import Peers, parse_peers
from flowspec.errors import AuthError, RequestRejected, StageFailed
from flowspec.net import Open, Timeouts, serve
from flowspec.node.build import Deployment, build_head, build_stage, deployment
from flowspec.node.head import HeadNode
from flowspec.node.local import free_ports
from flowspec.node.stage import StageNode
from flowspec.sched import Budget, Mode, SamplingParams, StageError
from tests.faults.test_kv_bound import tiny_llama

PROMPT = list(range(2, 12))


@dataclass
class Tiny:
    dep: Deployment
    peers: Peers
    timeouts: Timeouts
    nodes: dict[int, StageNode]
    servers: list[asyncio.Server]

    async def start_stage(self, k: int, dep: Deployment | None = None) -> None:
        node = self.nodes[k] = build_stage(dep or self.dep, self.peers, k, None, self.timeouts)
        peer = self.peers.stage(k)
        self.servers.append(await serve(peer.host, peer.port, hello=node.hello, secret=None, limits=node.limits,
                                        timeouts=self.timeouts, on_link=node.on_link))

    def head(self, recovery_timeout: float = 30.0) -> HeadNode:
        return build_head(self.dep, self.peers, None, self.timeouts, recovery_timeout=recovery_timeout)

    async def aclose(self) -> None:
        for server in self.servers:
            server.close()
        for node in self.nodes.values():
            await node.aclose()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("boot")
    return tiny_llama(tmp / "tiny-llama"), tmp / "cache"


@asynccontextmanager
async def pipeline(tiny_model: tuple[Path, Path], stages: int = 2) -> AsyncIterator[Tiny]:
    folder, cache = tiny_model
    ports = free_ports(stages + 1)
    tiny = Tiny(deployment(str(folder), stages, cache_dir=cache),
                parse_peers("\n".join(f"127.0.0.1:{p}" for p in ports)), Timeouts(), {}, [])
    try:
        yield tiny
    finally:
        await tiny.aclose()


@asynccontextmanager
async def connected_head(tiny_model: tuple[Path, Path]) -> AsyncIterator[tuple[Tiny, HeadNode]]:
    """Every stage up, and a head connected to them (closed afterwards)."""
    async with pipeline(tiny_model) as tiny:
        for k in (1, 2):
            await tiny.start_stage(k)
        head = tiny.head()
        await head.connect()
        try:
            yield tiny, head
        finally:
            await head.aclose()


async def generate(head: HeadNode, max_new_tokens: int = 6) -> list[int]:
    budget = Budget(mode=Mode.AR, num_stages=head.num_stages)
    return [t async for chunk in head.generate(PROMPT, budget, SamplingParams(), max_new_tokens) for t in chunk]


async def test_the_head_waits_for_a_stage_that_starts_late(tiny_model: tuple[Path, Path]) -> None:
    async with pipeline(tiny_model) as tiny:
        await tiny.start_stage(1)
        head = tiny.head(recovery_timeout=20.0)
        waits: list[tuple[int, str, float]] = []
        head.links.on_waiting = lambda *wait: waits.append(wait)
        connecting = asyncio.create_task(head.connect())
        await asyncio.sleep(1.5)  # stage 2 is still "booting"
        assert not connecting.done(), "the head gave up on a stage that was not up yet"
        await tiny.start_stage(2)
        try:
            await asyncio.wait_for(connecting, 10)
            assert {stage for stage, _, _ in waits} == {2}, waits
            assert waits[0][1] == tiny.peers.stage(2).address and waits[-1][2] > waits[0][2], waits
            assert len(await generate(head)) == 6
        finally:
            await head.aclose()


async def test_a_stage_that_never_comes_fails_after_the_deadline_naming_it(tiny_model: tuple[Path, Path]) -> None:
    async with pipeline(tiny_model) as tiny:
        await tiny.start_stage(1)
        head = tiny.head(recovery_timeout=1.0)
        started = time.monotonic()
        with pytest.raises(StageFailed, match=f"stage 2 at {tiny.peers.stage(2).address}"):
            await head.connect()
        assert 0.9 < time.monotonic() - started < 5.0


async def test_a_wrong_peer_is_refused_at_once_with_what_differs(tiny_model: tuple[Path, Path]) -> None:
    folder, cache = tiny_model
    async with pipeline(tiny_model) as tiny:
        other_split = deployment(str(folder), 2, [4, 2], cache_dir=cache)  # the head's is 3-3
        await tiny.start_stage(1)
        await tiny.start_stage(2, other_split)
        head = tiny.head(recovery_timeout=30.0)
        started = time.monotonic()
        with pytest.raises(AuthError, match="layer split 4-2 vs 3-3"):
            await head.connect()
        assert time.monotonic() - started < 3.0, "a wrong peer was retried instead of refused"


async def test_a_request_past_the_context_is_refused_before_anything_is_sent(
        tiny_model: tuple[Path, Path]) -> None:
    async with connected_head(tiny_model) as (tiny, head):
        sent = head.links.bytes_sent
        with pytest.raises(RequestRejected, match=r"max_new_tokens \(100000\).*context of 4096.*at most 4085"):
            await generate(head, max_new_tokens=100_000)
        with pytest.raises(RequestRejected, match="the prompt .5000 tokens."):
            budget = Budget(mode=Mode.AR, num_stages=2)
            async for _ in head.generate([3] * 5000, budget, SamplingParams(), 8):
                pass
        assert head.links.bytes_sent == sent, "a refused request reached the stages"
        assert len(await generate(head)) == 6


async def test_a_stage_refuses_a_request_with_an_error_frame_and_keeps_the_link(
        tiny_model: tuple[Path, Path]) -> None:
    async with connected_head(tiny_model) as (tiny, head):
        req, inbox = head.links.open_inbox()
        await head.links.send(1, Open(req, capacity=head.links.limits.max_positions + 10_000))
        refusal = await asyncio.wait_for(inbox.items.get(), 5)
        head.links.close_inbox(req)
        assert isinstance(refusal, StageError) and refusal.stage == 1 and refusal.code == "limits", refusal
        assert "past this model's context of 4096" in refusal.reason
        assert head.links.all_up and not tiny.nodes[1].requests
        assert len(await generate(head)) == 6, "the stage stopped serving after refusing one request"
