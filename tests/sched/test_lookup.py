"""Prompt lookup (flowspec/sched/lookup.py) against a brute-force search, and its scores."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from flowspec.sched.lookup import LookupScore, NgramIndex


def brute_force(tokens: list[int], length: int, max_n: int = 4, min_n: int = 2) -> list[int]:
    """What followed the latest earlier occurrence of the longest suffix n-gram that occurred before."""
    for n in range(min(max_n, len(tokens)), min_n - 1, -1):
        suffix = tokens[len(tokens) - n:]
        for end in range(len(tokens) - 1, n - 1, -1):  # an occurrence ending at `end` with something after it
            if tokens[end - n:end] == suffix:
                return tokens[end:end + length]
    return []


@given(tokens=st.lists(st.integers(0, 3), max_size=60), length=st.integers(1, 8),
       chunks=st.integers(1, 5))
def test_proposals_equal_a_brute_force_search(tokens: list[int], length: int, chunks: int) -> None:
    index = NgramIndex()
    step = max(1, len(tokens) // chunks)
    for i in range(0, len(tokens), step):  # fed in pieces, as prompt and verdicts arrive
        index.extend(tokens[i:i + step])
    assert index.propose(length) == brute_force(tokens, length)


def test_a_copied_passage_is_proposed() -> None:
    passage = [10, 11, 12, 13, 14, 15, 16, 17]
    index = NgramIndex()
    index.extend([1, 2, *passage, 3, 4, 10, 11, 12])
    assert index.propose(4) == [13, 14, 15, 16]
    assert NgramIndex().propose(4) == []


def test_scores_track_the_hit_rate_within_bounds() -> None:
    score = LookupScore()
    assert math.isclose(score.rate, 0.5)
    for _ in range(100):
        score.record(True)
    assert 0.9 < score.rate <= 0.98
    for _ in range(10_000):
        score.record(False)
    assert score.rate == 0.02 and score.logprob == math.log(0.02)
