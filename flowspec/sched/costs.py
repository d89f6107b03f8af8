"""Tree budgets from the devices' cost curves: what a step costs decides how wide and deep to draft.

A `CostModel` is three straight lines, in seconds: a stage forward over k new rows (the slowest stage's), one
drafter level over n beam rows, and the head's lm_head over n returned rows (with its per-step overhead). The
runtime measures them at start-up through each node's backend (so on the emulated testbed they are the
profile's costs, dilated); `choose_budget` turns them into a `Budget`. Flags still override any field.

The rules, each from one ratio of the curves:

* a segment (and a PipeDec layer) is as wide as a stage step stays cheap: at most `STEP_GROWTH` more than a
  one-row step. A flat-cost GPU stage gets wide segments, a Pi whose step grows 25 ms a row gets two or three;
* the beam is as wide as a drafter level stays cheap, by the same rule;
* a draft job is as deep as the head can afford while one segment passes a stage: the head spends each stage
  step on one returned segment's lm_head, and what remains of the step on drafter levels. So a Pi-class head
  drafts one level per job (small incremental drafts) and a Jetson-class head three;
* an expansion drafts about one segment's worth of nodes; a round's first tree two;
* a row beyond a segment's first goes out only if the draft gives it at least `per_row / t(1)` chance of being
  reached (what the row adds to a step): on a Pi a long shot waits, on a flat-cost stage every node goes.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from flowspec.errors import ConfigError
from flowspec.sched.budget import Budget, BudgetOverrides, Mode

__all__ = ["CostModel", "Line", "choose_budget"]

STEP_GROWTH = 0.5  # a segment may cost up to 1.5 one-row stage steps
SEGMENT_MENU = (1, 2, 3, 4, 6, 8, 12, 16)  # segment widths the rule picks from (the tree holds 64 nodes)
MAX_BEAM = 4
MAX_DEPTH = 4


@dataclass(frozen=True, slots=True)
class Line:
    """`fixed + per_row * n` seconds."""

    fixed: float
    per_row: float = 0.0

    def __post_init__(self) -> None:
        if not (self.fixed >= 0 and self.per_row >= 0):
            raise ConfigError(f"a cost line needs fixed >= 0 and per_row >= 0, got {self.fixed}, {self.per_row}")

    @classmethod
    def through(cls, n1: int, t1: float, n2: int, t2: float) -> Line:
        """The line through two measurements (slope clamped at 0: noise can make the wider one faster)."""
        if n2 == n1:
            raise ConfigError("two measurements at the same row count do not make a line")
        per_row = max(0.0, (t2 - t1) / (n2 - n1))
        return cls(max(0.0, t1 - per_row * n1), per_row)

    def __call__(self, n: int) -> float:
        return self.fixed + self.per_row * n


@dataclass(frozen=True, slots=True)
class CostModel:
    """Seconds per step on the devices of one pipeline (any common time unit works: only ratios are used)."""

    stage: Line  # the slowest stage's forward over k new rows
    lm_head: Line  # the head's lm_head over n rows, plus its per-step overhead
    draft: Line | None = None  # one drafter level over n beam rows (None: no drafter measured yet)

    def to_json(self) -> dict[str, Any]:
        return {f.name: None if getattr(self, f.name) is None else
                {"fixed": getattr(self, f.name).fixed, "per_row": getattr(self, f.name).per_row}
                for f in fields(self)}


def _widest(line: Line, menu: tuple[int, ...]) -> int:
    """The widest n in `menu` whose cost stays within STEP_GROWTH of a one-row step."""
    limit = line(1) * (1 + STEP_GROWTH)
    return max((n for n in menu if line(n) <= limit), default=1)


def choose_budget(mode: Mode, num_stages: int, costs: CostModel | None,
                  overrides: BudgetOverrides = BudgetOverrides()) -> Budget:
    """The budget for `mode` on devices costing `costs`; `overrides` (Budget fields the user set) win, and
    the chosen fields they would clash with give way (a small max_tree shrinks the chosen trees; nothing else
    changes). Overrides that clash among themselves are a ConfigError.

    Without costs (nothing measured) the Budget defaults stand, which suit CPU stages."""
    if costs is None or costs.draft is None or mode is Mode.AR:
        return _with(mode, num_stages, {}, overrides)
    segment = _widest(costs.stage, SEGMENT_MENU)
    beam = _widest(costs.draft, tuple(range(1, MAX_BEAM + 1)))
    # head time left per stage step once the returned segment's lm_head ran, in drafter levels
    spare = costs.stage(segment) - costs.lm_head(segment)
    levels = int(spare // costs.draft(beam)) if costs.draft(beam) > 0 else MAX_DEPTH
    expand_depth = min(MAX_DEPTH - 1, max(0, levels - 1))
    auto: dict[str, Any] = {
        "segment": segment,
        "width": min(segment, MAX_BEAM),
        "topk": beam,
        "depth": min(MAX_DEPTH, max(1, levels + 1)),
        "expand_depth": expand_depth,
        "expand_tokens": max(2, segment),
        "init_tokens": max(4, min(32, 2 * segment)),
        "expand_from_leaf": True,
        "draft_ahead": True,
        "lookup": min(8, max(2, segment)),
        "max_tree": max(64, 2 * segment * (num_stages + 1)),
        # a row is worth sending when its chance of being accepted pays for what it adds to a step
        # (three decimals: measurement noise must not make two runs' budgets differ)
        "min_reach": round(min(0.5, costs.stage.per_row / costs.stage(1)), 3) if costs.stage(1) > 0 else 0.0,
    }
    return _with(mode, num_stages, auto, overrides)


def _with(mode: Mode, num_stages: int, chosen: dict[str, Any], overrides: BudgetOverrides) -> Budget:
    """Budget from the chosen fields (over Budget's defaults) and the overrides, which win."""
    base, given = Budget(mode, num_stages), dict(overrides.items())
    values = {**chosen, **given}
    tree = values.get("max_tree", base.max_tree)
    for name in ("init_tokens", "expand_tokens"):  # the one rule across fields: trees fit under max_tree
        if name not in given:
            values[name] = min(values.get(name, getattr(base, name)), tree - 1)
    if "max_tree" not in given:
        values["max_tree"] = max(tree, values["init_tokens"] + 1, values["expand_tokens"] + 1)
    return replace(base, **values)
