"""Emulated device speed: a step takes max(real compute, profile cost x dilation).

Without a profile the pacer does nothing. With one, a step that finished early sleeps until the profile's
time; a step whose real compute exceeded it is an overrun, counted and reported, never hidden.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

__all__ = ["Pacer"]


class Pacer:
    def __init__(self, cost: Callable[[int], float] | None = None, dilation: float = 1.0) -> None:
        self.cost, self.dilation = cost, dilation
        self.overruns = 0
        self.steps = 0

    async def pace(self, tokens: int, start: float, end: float) -> float:
        """Called after a compute of `tokens` rows that ran [start, end); returns when the step ends."""
        if self.cost is None:
            return end
        self.steps += 1
        target = start + self.cost(tokens) * self.dilation
        if end > target:
            self.overruns += 1
            return end
        await asyncio.sleep(target - time.monotonic())
        return target
