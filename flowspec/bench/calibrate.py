"""Pick the time dilation D so this machine's real compute fits under a device profile.

Times, on this machine, the real costs the emulated run will pace: one stage forward for the largest segment
the run sends (and one prefill chunk), the target's lm_head over a segment, and the drafter's context pass and
tree levels. D = margin × the worst real/profile ratio, so every paced step has `margin` of headroom.
Stage processes run with one torch thread each; the stage forward is timed with one thread too.

Each item is timed `reps` times after a warm-up and its median counts: one sample slowed by another process
on a shared machine (or sped up by a lucky cache) must not set D, which scales the whole run's wall time.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from flowspec.bench.profiles import Profile

__all__ = ["Calibration", "calibrate", "dilation_from", "time_samples"]

REPS = 7  # samples per item after the warm-up: the median of 7 ignores up to 3 disturbed ones


@dataclass
class Calibration:
    dilation: float
    margin: float
    ratios: dict[str, float] = field(default_factory=dict)  # what -> median real / profile cost
    real_ms: dict[str, float] = field(default_factory=dict)  # what -> median real ms
    spread_ms: dict[str, tuple[float, float, float]] = field(default_factory=dict)  # what -> min, median, max

    @property
    def binding(self) -> str:
        return max(self.ratios, key=self.ratios.__getitem__) if self.ratios else ""

    def to_json(self) -> dict[str, Any]:
        return {"dilation": self.dilation, "margin": self.margin, "binding": self.binding,
                "ratios": {k: round(v, 3) for k, v in self.ratios.items()},
                "real_ms": {k: round(v, 2) for k, v in self.real_ms.items()},
                "spread_ms": {k: {"min": round(lo, 2), "median": round(mid, 2), "max": round(hi, 2)}
                              for k, (lo, mid, hi) in self.spread_ms.items()}}


def time_samples(fn: Callable[[], object], reps: int = REPS,
                 timer: Callable[[], float] = time.perf_counter) -> list[float]:
    """Seconds of `reps` calls of `fn`, after one untimed warm-up call."""
    fn()
    samples = []
    for _ in range(reps):
        t = timer()
        fn()
        samples.append(timer() - t)
    return samples


def dilation_from(samples: dict[str, list[float]], costs: dict[str, float], margin: float) -> Calibration:
    """D from real samples (seconds) and the profile's cost of each item: margin × the worst ratio of an
    item's median sample to its cost, rounded up to two significant digits, and at least 1."""
    cal = Calibration(dilation=1.0, margin=margin)
    for what, xs in samples.items():
        median = statistics.median(xs)
        cal.spread_ms[what] = (min(xs) * 1e3, median * 1e3, max(xs) * 1e3)
        cal.real_ms[what] = median * 1e3
        cal.ratios[what] = median / costs[what]
    want = max(cal.ratios.values()) * margin
    cal.dilation = max(1.0, float(f"{want:.2g}"))
    if cal.dilation < want:  # rounded down: round the next step up instead
        cal.dilation = float(f"{want * 1.05:.2g}")
    return cal


def calibrate(profile: Profile, dep: Any, drafter: Any, *, segment_rows: int, beam: int, draft_rows: int,
              context: int = 128, prefill_rows: int = 60, margin: float = 1.3, reps: int = REPS,
              timer: Callable[[], float] = time.perf_counter) -> Calibration:
    """`dep`: a flowspec.node.build.Deployment; `drafter`: a real (unpaced) Drafter or None for ar only."""
    from flowspec.store import load_head, load_stage

    samples: dict[str, list[float]] = {}
    costs: dict[str, float] = {}

    def note(what: str, fn: Callable[[], object], cost: float) -> None:
        samples[what] = time_samples(fn, reps, timer)
        costs[what] = cost

    # the heaviest stage by layer count (stage 1 also embeds, which is a cheap lookup)
    k = max(range(len(dep.counts)), key=lambda i: (dep.counts[i], -i)) + 1
    stage = load_stage(dep.shard(k), verify=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the stage processes (LocalCluster threads=1)
    try:
        cache = stage.new_cache(context + prefill_rows + segment_rows + 8)
        h = dep.config.hidden_size

        def fwd(n: int) -> None:
            x = torch.randint(0, 100, (n,)) if k == 1 else torch.randn(n, h)
            start = cache.length
            with torch.no_grad():
                stage.forward(x, torch.arange(start, start + n), cache)
            cache.truncate(start)

        with torch.no_grad():  # a context in the cache, as during decoding
            stage.forward(torch.randint(0, 100, (context,)) if k == 1 else torch.randn(context, h),
                          torch.arange(0, context), cache)
        for n in sorted({1, segment_rows}):
            note(f"stage_forward_{n}", functools.partial(fwd, n), profile.stage_cost(n, context))
        note(f"stage_prefill_{prefill_rows}", functools.partial(fwd, prefill_rows), profile.stage_cost(prefill_rows, 0))
    finally:
        torch.set_num_threads(threads)

    head = load_head(dep.shard(0), verify=False)
    hidden = torch.randn(segment_rows, dep.config.hidden_size)

    def lm_head() -> None:
        with torch.no_grad():
            head.forward(hidden)

    note(f"lm_head_{segment_rows}", lm_head, profile.head_step_cost(segment_rows))

    if drafter is not None:
        ctx = list(range(100, 100 + context))
        state = drafter.new_state()

        def fused() -> None:
            state.sync(ctx[:-4])
            state.flush()
            state.sync(ctx)  # 4 newly accepted tokens: they ride in the next level's forward
            state.expand(list(range(200, 200 + beam)), [-1] * beam, [context] * beam)

        fused_cost = (profile.draft_level_cost(beam) + profile.tree_build
                      + max(0.0, profile.draft_context_cost(4) - profile.draft_level_cost(0)))
        note(f"draft_context_4+level_{beam}", fused, fused_cost)
        for n in sorted({beam, draft_rows}):
            def level(n: int = n) -> None:
                state.reset_scratch()
                state.expand(list(range(200, 200 + n)), [-1] * n, [context] * n)

            note(f"draft_level_{n}", level, profile.draft_level_cost(n))
        state.reset_scratch()
    return dilation_from(samples, costs, margin)
