"""Several requests through one head at once: each produces exactly what it produces alone (greedy: the same
tokens; seeded sampling: the same draws), in every mode, and their segments interleave on the stages instead of
queueing whole requests (ARCHITECTURE.md, "Concurrent requests")."""

from __future__ import annotations

import asyncio

import pytest

from flowspec.api import Cluster, Request
from flowspec.node.head import GenerationResult
from tests.e2e.conftest import specbench_prompts

NEW = 16
DRAFT = "self:layers=20"
PROMPTS = [*specbench_prompts(("mt_bench", "qa", "humaneval")), "Write a haiku about pipelines."]
TRIO = PROMPTS[:3]

pytestmark = pytest.mark.slow


async def _solo_then_together(cluster: Cluster, jobs: list[tuple[str, Request]]
                              ) -> tuple[list[GenerationResult], list[GenerationResult]]:
    solo = [await cluster.generate(text, request) for text, request in jobs]
    together = await asyncio.gather(*(cluster.generate(text, request) for text, request in jobs))
    return solo, list(together)


def _overlap(a: GenerationResult, b: GenerationResult, stage: int) -> bool:
    """Whether the two requests' work on `stage` overlapped in time (segments of both in flight together)."""
    sa, sb = a.busy.get(stage, []), b.busy.get(stage, [])
    return bool(sa and sb) and sa[0][0] < sb[-1][1] and sb[0][0] < sa[-1][1]


async def test_concurrent_flowspec_requests_equal_their_solo_output(head_for) -> None:  # type: ignore[no-untyped-def]
    async with head_for(3, draft=DRAFT) as cluster:
        jobs = [(text, Request(mode="flowspec", max_new_tokens=NEW)) for text in TRIO]
        solo, together = await _solo_then_together(cluster, jobs)
        assert cluster.head.links.open_requests == 0
    for (text, _), alone, shared in zip(jobs, solo, together):
        assert shared.tokens == alone.tokens, f"prompt {text[:40]!r}"
        assert shared.finish_reason == alone.finish_reason
    # interleaved on the stages, not queued: every pair of requests was in flight together on stage 2
    for i in range(1, len(together)):
        assert _overlap(together[0], together[i], 2), f"request {i} did not overlap request 0 on stage 2"


async def test_concurrent_mixed_modes_and_seeded_sampling(head_for) -> None:  # type: ignore[no-untyped-def]
    jobs = [
        (PROMPTS[0], Request(mode="ar", max_new_tokens=NEW)),
        (PROMPTS[1], Request(mode="flowspec", max_new_tokens=NEW)),
        (PROMPTS[2], Request(mode="chunk", max_new_tokens=NEW)),
        (PROMPTS[3], Request(mode="pipedec", max_new_tokens=NEW)),
        (PROMPTS[0], Request(mode="flowspec", max_new_tokens=NEW, temperature=0.8, seed=7)),
        (PROMPTS[1], Request(mode="ar", max_new_tokens=NEW, temperature=0.8, top_p=0.9, seed=11)),
    ]
    async with head_for(2, draft=DRAFT) as cluster:
        solo, together = await _solo_then_together(cluster, jobs)
    for (text, request), alone, shared in zip(jobs, solo, together):
        assert shared.tokens == alone.tokens, f"{request.mode} t={request.temperature} prompt {text[:40]!r}"


async def test_requests_over_the_head_limit_wait_their_turn(head_for) -> None:  # type: ignore[no-untyped-def]
    """The head admits `max_requests` at once (a stage refuses more); the rest wait, and all finish."""
    async with head_for(2, draft=DRAFT) as cluster:
        cluster.head.max_requests = 2
        request = Request(mode="flowspec", max_new_tokens=8)
        results = await asyncio.gather(*(cluster.generate(text, request) for text in PROMPTS))
        alone = await cluster.generate(PROMPTS[3], request)
    assert all(len(r.tokens) == 8 for r in results)
    assert results[3].tokens == alone.tokens
