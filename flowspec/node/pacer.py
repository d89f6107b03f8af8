"""Emulated device speed: a step takes max(real compute, profile cost x dilation).

Without a profile the pacer does nothing. With one, a step that finished early waits until the profile's
time; a step whose real compute exceeded it is an overrun, counted and reported, never hidden.

Two ways to pace:

* ``await pace(tokens, start, end)`` after a compute that ran [start, end) on the compute thread: waits on the
  event loop (stages: the compute thread is free while the device "finishes", which is harmless because a
  stage computes one thing at a time per request).
* ``run(fn, cost_s, *args)`` on the compute thread itself: times ``fn`` and sleeps *on that thread* until the
  profile's time, so everything sharing the thread (the head's lm_head and drafter: one device) is serialized
  exactly as on the emulated device.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import TypeVar

__all__ = ["HeadDevice", "PacedDrafter", "PacedLMHead", "Pacer"]

T = TypeVar("T")


class Pacer:
    def __init__(self, cost: Callable[..., float] | None = None, dilation: float = 1.0,
                 *, context_aware: bool = False) -> None:
        """`cost(tokens)` (or `cost(tokens, ctx)` with `context_aware`) is the device's time in seconds."""
        self.cost, self.dilation, self.context_aware = cost, dilation, context_aware
        self.overruns = 0
        self.steps = 0
        self.real_s = 0.0  # summed real compute of paced steps
        self.paced_s = 0.0  # summed profile time x dilation of paced steps
        self.worst_ratio = 0.0  # max over steps of real / (profile x dilation)
        self._lock = threading.Lock()

    @property
    def active(self) -> bool:
        return self.cost is not None

    def _account(self, budget: float, real: float) -> bool:
        with self._lock:
            self.steps += 1
            self.real_s += real
            self.paced_s += budget
            if budget > 0:
                self.worst_ratio = max(self.worst_ratio, real / budget)
            over = real > budget
            if over:
                self.overruns += 1
            return over

    def budget(self, tokens: int, ctx: int = 0) -> float:
        assert self.cost is not None
        cost = self.cost(tokens, ctx) if self.context_aware else self.cost(tokens)
        return float(cost) * self.dilation

    async def pace(self, tokens: int, start: float, end: float, ctx: int = 0) -> float:
        """Called after a compute of `tokens` rows that ran [start, end); returns when the step ends."""
        if self.cost is None:
            return end
        budget = self.budget(tokens, ctx)
        target = start + budget
        if self._account(budget, end - start):
            return end
        await asyncio.sleep(max(0.0, target - time.monotonic()))
        return target

    def charge(self, cost_s: float, start: float, end: float) -> float:
        """Blocking: the step [start, end) costs `cost_s` on the device (× dilation); sleep on this thread
        until then. Returns the step's end."""
        if self.cost is None:
            return end
        budget = cost_s * self.dilation
        target = start + budget
        if self._account(budget, end - start):
            return end
        delay = target - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        return target

    def run(self, fn: Callable[..., T], cost_s: float, *args: object) -> T:
        """Blocking: `fn(*args)` paced to `cost_s` of device time (call it on the compute thread)."""
        start = time.monotonic()
        out = fn(*args)
        self.charge(cost_s, start, time.monotonic())
        return out

    def report(self) -> dict[str, float]:
        return {"steps": self.steps, "overruns": self.overruns, "real_s": round(self.real_s, 4),
                "paced_s": round(self.paced_s, 4), "worst_ratio": round(self.worst_ratio, 3)}


class HeadDevice:
    """The head device (D0) of an emulated testbed: the target's lm_head and the drafter share one device.

    Wraps the real `lm_head` and drafter so every call is charged on the compute thread, where HeadNode runs
    them: lm_head over n rows costs `profile.lm_head_cost(n) + cpu_overhead` (one head step), a drafter
    context sync costs `draft_context_cost(new tokens) + tree_build`, and each `expand` over n tokens (one tree
    level, job.feed included) costs `draft_level_cost(n)`, all × dilation. Busy intervals are recorded
    (`busy`: (start, end, kind) with kind "lm_head" / "draft") for timelines and D0 busy fractions.
    """

    def __init__(self, profile: object, dilation: float) -> None:
        self.profile: object = profile
        self.pacer = Pacer(getattr(profile, "head_step_cost"), dilation)
        self.busy: list[tuple[float, float, str]] = []

    def _run(self, kind: str, cost_s: float, fn: Callable[..., T], *args: object) -> T:
        start = time.monotonic()
        out = fn(*args)
        end = self.pacer.charge(cost_s, start, time.monotonic())
        self.busy.append((start, end, kind))
        return out

    def lm_head(self, real: object) -> PacedLMHead:
        return PacedLMHead(real, self)

    def drafter(self, real: object) -> PacedDrafter:
        return PacedDrafter(real, self)


class PacedLMHead:
    def __init__(self, real: object, device: HeadDevice) -> None:
        self.real, self.device = real, device

    def forward(self, hidden: object) -> object:
        n = int(getattr(hidden, "shape")[0])
        cost = getattr(self.device.profile, "head_step_cost")(n)
        return self.device._run("lm_head", cost, getattr(self.real, "forward"), hidden)

    __call__ = forward

    def __getattr__(self, name: str) -> object:
        return getattr(self.real, name)


class PacedDrafter:
    """A drafter whose sync and expand calls are charged at the profile's draft costs."""

    def __init__(self, real: object, device: HeadDevice) -> None:
        self.real, self.device = real, device

    def sync(self, committed: object) -> None:
        # The drafter only records the new context here; its rows ride along with the next expand's forward,
        # which is charged for them. What remains is the head's tree bookkeeping.
        cost = getattr(self.device.profile, "tree_build")
        self.device._run("draft", cost, getattr(self.real, "sync"), committed)

    def expand(self, tokens: list[int], parents: list[int], positions: list[int]) -> object:
        prof = self.device.profile
        pending = int(getattr(self.real, "pending", 0))
        level = getattr(prof, "draft_level_cost")
        # the context pass rides in this level's forward: charge its per-token part, not a second fixed cost
        extra = max(0.0, getattr(prof, "draft_context_cost")(pending) - level(0))
        cost = level(len(tokens)) + extra
        return self.device._run("draft", cost, getattr(self.real, "expand"), tokens, parents, positions)

    def __getattr__(self, name: str) -> object:
        return getattr(self.real, name)
