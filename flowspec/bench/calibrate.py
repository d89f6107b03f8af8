"""Pick the time dilation D so this machine's real compute fits under a device profile.

Times, on this machine, the real costs the emulated run will pace: one stage forward for the largest segment
the run sends (and one prefill chunk), the target's lm_head over a segment, and the drafter's context pass and
tree levels. D = margin × the worst real/profile ratio, so every paced step has `margin` of headroom.
Stage processes run with one torch thread each; the stage forward is timed with one thread too.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from flowspec.bench.profiles import Profile

__all__ = ["Calibration", "calibrate"]


@dataclass
class Calibration:
    dilation: float
    margin: float
    ratios: dict[str, float] = field(default_factory=dict)  # what -> real / profile cost
    real_ms: dict[str, float] = field(default_factory=dict)

    @property
    def binding(self) -> str:
        return max(self.ratios, key=self.ratios.__getitem__) if self.ratios else ""

    def to_json(self) -> dict[str, Any]:
        return {"dilation": self.dilation, "margin": self.margin, "binding": self.binding,
                "ratios": {k: round(v, 3) for k, v in self.ratios.items()},
                "real_ms": {k: round(v, 2) for k, v in self.real_ms.items()}}


def _best_of(fn: Callable[[], object], reps: int = 3) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def calibrate(profile: Profile, dep: Any, drafter: Any, *, segment_rows: int, beam: int, draft_rows: int,
              context: int = 128, prefill_rows: int = 60, margin: float = 1.3) -> Calibration:
    """`dep`: a flowspec.node.build.Deployment; `drafter`: a real (unpaced) Drafter or None for ar only."""
    from flowspec.store import load_head, load_stage

    cal = Calibration(dilation=1.0, margin=margin)

    def note(what: str, real: float, cost: float) -> None:
        cal.real_ms[what] = real * 1e3
        cal.ratios[what] = real / cost

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
            note(f"stage_forward_{n}", _best_of(functools.partial(fwd, n)), profile.stage_cost(n, context))
        note(f"stage_prefill_{prefill_rows}", _best_of(lambda: fwd(prefill_rows), 2),
             profile.stage_cost(prefill_rows, 0))
    finally:
        torch.set_num_threads(threads)

    head = load_head(dep.shard(0), verify=False)
    hidden = torch.randn(segment_rows, dep.config.hidden_size)
    with torch.no_grad():
        note(f"lm_head_{segment_rows}", _best_of(lambda: head.forward(hidden)), profile.head_step_cost(segment_rows))

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
        note(f"draft_context_4+level_{beam}", _best_of(fused), fused_cost)
        for n in sorted({beam, draft_rows}):
            def level(n: int = n) -> None:
                state.reset_scratch()
                state.expand(list(range(200, 200 + n)), [-1] * n, [context] * n)

            note(f"draft_level_{n}", _best_of(level), profile.draft_level_cost(n))
        state.reset_scratch()

    worst = max(cal.ratios.values())
    cal.dilation = max(1.0, float(f"{worst * margin:.2g}"))  # two significant digits
    if cal.dilation < worst * margin:
        cal.dilation = float(f"{worst * margin * 1.05:.2g}")
    return cal
