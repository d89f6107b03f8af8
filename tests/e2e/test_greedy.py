"""Temperature 0 over real TCP: every mode, drafter and stage count equals transformers' greedy generate."""

from __future__ import annotations

import pytest

from flowspec.api import Request
from tests.e2e.conftest import specbench_prompts

NEW = 32
SPEC_NEW = 16
PROMPTS = specbench_prompts()


@pytest.mark.parametrize("n", [1, 2, 3, 4])
async def test_ar_equals_transformers(n, head_for, smol_ref) -> None:  # type: ignore[no-untyped-def]
    async with head_for(n) as cluster:
        for text in PROMPTS:
            ids = cluster.encode(text)
            result = await cluster.generate(ids, Request(mode="ar", max_new_tokens=NEW))
            assert result.tokens == smol_ref.greedy(ids, NEW), f"{n} stages, prompt {text[:40]!r}"
            assert result.stats.mean_accepted == 1.0


# Each mode sees every drafter and every stage count 2..5 at least once (not the full cross product).
SPEC_CASES = [
    ("chunk", "self", 2), ("chunk", "self:layers=20", 3), ("chunk", "random", 4), ("chunk", "self:layers=20", 5),
    ("pipedec", "self:layers=20", 2), ("pipedec", "random", 3), ("pipedec", "self", 4), ("pipedec", "random", 5),
    ("flowspec", "random", 2), ("flowspec", "self", 3), ("flowspec", "self:layers=20", 4),
    ("flowspec", "self:layers=20", 5),
]


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "draft", "n"), SPEC_CASES)
async def test_speculative_equals_transformers(mode, draft, n, head_for, smol_ref) -> None:  # type: ignore[no-untyped-def]
    text = PROMPTS[(len(mode) + n) % len(PROMPTS)]
    async with head_for(n, draft=draft) as cluster:
        ids = cluster.encode(text)
        result = await cluster.generate(ids, Request(mode=mode, max_new_tokens=SPEC_NEW))
    assert result.tokens == smol_ref.greedy(ids, SPEC_NEW), f"{mode} {draft} {n} stages, prompt {text[:40]!r}"
    if draft == "self" and mode == "chunk":  # the target drafting for itself: whole tree paths accepted
        assert result.stats.mean_accepted > 1.5, result.stats
    if draft == "self" and mode == "flowspec":  # step-wise: a verification accepts what its segment holds
        assert result.stats.mean_accepted > 1.0, (  # the round's root waits for its tree (Budget.eager_root)
            f"flowspec with a perfect drafter never accepts a drafted token: {result.stats}")
