"""Start-up probes: what a stage forward, the lm_head and a drafter level cost on the device a node runs on.

Each probe runs its work through the node's `Backend`, as a request would, so the answer is the device's: on
real hardware the measured time, on the emulated testbed the profile's cost (dilated). The head turns the
answers into a `flowspec.sched.CostModel` and picks tree budgets from it (flowspec/sched/costs.py).

A probe is two widths, one warm-up (not timed, not charged) and the best of `REPS` timings per width: the best,
because a probe that shares the machine with other work can only come out slow, never fast.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from flowspec.node.backend import Backend, Work, WorkKind
from flowspec.sched.costs import Line

__all__ = ["PROBE_ROWS", "line_from", "probe_drafter", "probe_lm_head", "probe_stage"]

PROBE_ROWS = (1, 16)  # the row counts each probe times: enough to fit a line's fixed and per-row parts
REPS = 2
_CONTEXT = 32  # tokens cached before a stage forward is timed, as during decoding


async def _best(backend: Backend, kind: WorkKind, rows: int, fn: Callable[[], Any], context: int = 0) -> float:
    best = float("inf")
    for _ in range(REPS):
        _, start, end = await backend.run(Work(kind, rows=rows, context=context), fn)
        best = min(best, end - start)
    return best


async def probe_stage(model: Any, backend: Backend) -> tuple[tuple[int, float], ...]:
    """(rows, seconds) of one forward of `model` (a StageModel) over each of PROBE_ROWS new rows."""
    cfg = model.cfg
    cache = model.new_cache(_CONTEXT + max(PROBE_ROWS))

    def rows(n: int) -> torch.Tensor:
        if model.embed is not None:
            return torch.zeros(n, dtype=torch.long)
        return torch.zeros(n, cfg.hidden_size)

    model.forward(rows(_CONTEXT), torch.arange(_CONTEXT), cache)
    out = []
    for n in PROBE_ROWS:
        def forward(n: int = n) -> None:
            model.forward(rows(n), torch.arange(_CONTEXT, _CONTEXT + n), cache)
            cache.truncate(_CONTEXT)

        forward()  # warm-up, on this thread: not charged
        out.append((n, await _best(backend, WorkKind.STAGE_FORWARD, n, forward, _CONTEXT)))
    return tuple(out)


async def probe_lm_head(lm_head: Any, hidden_size: int, backend: Backend) -> Line:
    """The head's lm_head over n rows (with the per-step overhead a backend charges), as a line."""
    points = []
    for n in PROBE_ROWS:
        hidden = torch.zeros(n, hidden_size)

        def logits(hidden: torch.Tensor = hidden) -> None:
            lm_head.forward(hidden)

        logits()  # warm-up
        points.append((n, await _best(backend, WorkKind.LM_HEAD, n, logits)))
    return line_from(points)


async def probe_drafter(drafter: Any, backend: Backend) -> Line:
    """One drafter level over n beam rows, as a line (the widths a beam takes: 1 and 4)."""
    state = drafter.new_state(64)
    state.sync(list(range(1, 9)))
    points = []
    for n in (1, 4):
        def level(n: int = n) -> None:
            state.reset_scratch()  # nothing known: every row is forwarded (distinct tokens, or rows would merge)
            state.expand(list(range(1, n + 1)), [-1] * n, [8] * n)

        level()  # warm-up; also takes the synced context into the cache, so timings are levels alone
        points.append((n, await _best(backend, WorkKind.DRAFT_LEVEL, n, level)))
    return line_from(points)


def line_from(points: Sequence[tuple[int, float]]) -> Line:
    """The cost line through the first and last of (rows, seconds) measurements."""
    (n1, t1), (n2, t2) = points[0], points[-1]
    return Line.through(n1, t1, n2, t2) if n2 != n1 else Line(t1)
