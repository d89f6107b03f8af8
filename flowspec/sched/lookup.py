"""Zero-cost draft candidates: what followed the committed text's last few tokens earlier on (prompt lookup).

Summaries, code edits and answers over a passage copy long runs of the prompt. When the last `n` committed
tokens occurred before, the tokens that followed them then are a free guess for what follows now: no drafter
forward, no head compute. The scheduler hangs the guess under the tree's root, scored so that it competes
fairly with the drafter's nodes in the one priority queue (`LookupScore`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

__all__ = ["LookupScore", "NgramIndex"]


class NgramIndex:
    """The latest earlier occurrence of every n-gram (n = min_n..max_n) of a growing token sequence."""

    def __init__(self, max_n: int = 4, min_n: int = 2) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError(f"need 1 <= min_n <= max_n, got {min_n}, {max_n}")
        self.max_n, self.min_n = max_n, min_n
        self.tokens: list[int] = []
        self._after: dict[tuple[int, ...], int] = {}  # n-gram -> index of the token that followed it last

    def extend(self, tokens: Iterable[int]) -> None:
        for token in tokens:
            # the n-grams ending just before `token` now have a continuation: register them. The sequence's
            # own suffix is registered only once something follows it, so a lookup never finds itself.
            end = len(self.tokens)
            for n in range(self.min_n, min(self.max_n, end) + 1):
                self._after[tuple(self.tokens[end - n:end])] = end
            self.tokens.append(int(token))

    def propose(self, length: int) -> list[int]:
        """Up to `length` tokens that followed the longest earlier match of the sequence's suffix ([] if none)."""
        tokens = self.tokens
        for n in range(min(self.max_n, len(tokens)), self.min_n - 1, -1):
            start = self._after.get(tuple(tokens[len(tokens) - n:]))
            if start is not None:
                return tokens[start:start + length]
        return []


class LookupScore:
    """The log-probability a looked-up token gets in the tree: how often looked-up tokens were right so far.

    Drafter nodes are scored by the drafter's log-probabilities; a looked-up token gets log(p), with p this
    request's running rate of looked-up tokens that the target confirmed (given their parent was), starting
    from an even prior. Good guesses soon outrank the drafter's and go out first; bad ones sink in the queue.
    """

    def __init__(self, prior_hits: float = 1.0, prior_tries: float = 2.0) -> None:
        self.hits, self.tries = prior_hits, prior_tries

    def record(self, hit: bool) -> None:
        self.tries += 1
        self.hits += hit

    @property
    def rate(self) -> float:
        return min(0.98, max(0.02, self.hits / self.tries))

    @property
    def logprob(self) -> float:
        return math.log(self.rate)
