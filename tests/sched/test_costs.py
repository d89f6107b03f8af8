"""Budgets from cost curves (flowspec/sched/costs.py): always valid, and shaped by the curves as documented."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flowspec.bench.profiles import builtin_profiles
from flowspec.errors import ConfigError
from flowspec.sched import Budget, BudgetOverrides, CostModel, Line, Mode, choose_budget

lines = st.builds(Line, st.floats(1e-4, 1.0), st.floats(0.0, 0.1))


@given(stage=lines, lm_head=lines, draft=lines, stages=st.integers(1, 8), mode=st.sampled_from(list(Mode)))
def test_any_cost_curve_gives_a_valid_budget(stage: Line, lm_head: Line, draft: Line, stages: int,
                                             mode: Mode) -> None:
    b = choose_budget(mode, stages, CostModel(stage, lm_head, draft))
    assert b.mode is mode and b.num_stages == stages
    assert 1 <= b.segment <= 16 and 1 <= b.topk <= 4 and b.max_tree > max(b.init_tokens, b.expand_tokens)
    if mode is not Mode.AR:  # a segment never costs more than 1.5 one-row stage steps
        assert stage(b.segment) <= 1.5 * stage(1) + 1e-12


@given(fixed=st.floats(0.01, 1.0), slope=st.floats(0.0, 0.05), steeper=st.floats(1.0, 10.0), head=lines,
       draft=lines)
def test_a_steeper_stage_never_gets_wider_segments(fixed: float, slope: float, steeper: float, head: Line,
                                                   draft: Line) -> None:
    flat = choose_budget(Mode.FLOWSPEC, 4, CostModel(Line(fixed, slope), head, draft))
    steep = choose_budget(Mode.FLOWSPEC, 4, CostModel(Line(fixed, slope * steeper), head, draft))
    assert steep.segment <= flat.segment and steep.width <= flat.width


def test_edge_profiles_get_what_their_curves_call_for() -> None:
    profiles = builtin_profiles()
    jetson = choose_budget(Mode.FLOWSPEC, 4, profiles["jetson-7b"].cost_model())
    pi = choose_budget(Mode.FLOWSPEC, 4, profiles["pi5-8b"].cost_model())
    # a flat-cost GPU stage: wide segments, and a head with time for three 15 ms levels per 63 ms step
    assert (jetson.segment, jetson.topk, jetson.expand_depth) == (16, 4, 2)
    # a Pi: a row adds 25 ms to a 115 ms step, a drafter level 45 ms + 12 ms a row: small incremental drafts
    assert pi.segment <= 3 and pi.expand_depth == 0 and pi.topk <= 3
    assert jetson.draft_ahead and jetson.expand_from_leaf and jetson.lookup > 0
    # a row is priced by what it adds to a step: next to nothing on the Jetson, a fifth of a step on the Pi
    assert jetson.min_reach < 0.01 and 0.15 < pi.min_reach < 0.3


def test_overrides_win_and_no_measurements_keep_the_defaults() -> None:
    costs = builtin_profiles()["jetson-7b"].cost_model()
    assert choose_budget(Mode.FLOWSPEC, 4, costs, BudgetOverrides(segment=3, lookup=0)).segment == 3
    assert choose_budget(Mode.FLOWSPEC, 4, costs, BudgetOverrides(lookup=0)).lookup == 0
    assert choose_budget(Mode.FLOWSPEC, 4, None) == Budget(Mode.FLOWSPEC, 4)
    assert choose_budget(Mode.FLOWSPEC, 4, CostModel(costs.stage, costs.lm_head)) == Budget(Mode.FLOWSPEC, 4)
    with pytest.raises(ConfigError):
        choose_budget(Mode.FLOWSPEC, 4, costs, BudgetOverrides(segment=0))


def test_a_line_through_two_measurements() -> None:
    line = Line.through(1, 0.0602, 16, 0.0632)
    assert line(1) == pytest.approx(0.0602) and line(16) == pytest.approx(0.0632)
    assert Line.through(1, 0.05, 16, 0.04).per_row == 0.0  # noise made the wider step faster: flat, not negative
    with pytest.raises(ConfigError):
        Line(-1.0)


def test_an_override_that_clashes_with_a_chosen_value_keeps_every_other_chosen_value() -> None:
    """A small max_tree shrinks the chosen trees under it; the segment, beam and the rest stay as chosen (they
    used to fall back to Budget's defaults wholesale)."""
    costs = builtin_profiles()["jetson-7b"].cost_model()
    chosen = choose_budget(Mode.FLOWSPEC, 4, costs)
    small = choose_budget(Mode.FLOWSPEC, 4, costs, BudgetOverrides(max_tree=8))
    assert small.max_tree == 8 and small.init_tokens <= 7 and small.expand_tokens <= 7
    assert (small.segment, small.topk, small.depth, small.min_reach, small.draft_ahead) == \
        (chosen.segment, chosen.topk, chosen.depth, chosen.min_reach, chosen.draft_ahead)
    big = choose_budget(Mode.FLOWSPEC, 4, None, BudgetOverrides(init_tokens=100))
    assert big.init_tokens == 100 and big.max_tree == 101  # the chosen bound grows to hold the tree asked for
    with pytest.raises(ConfigError, match="max_tree must exceed"):  # both set by the user: theirs to mend
        choose_budget(Mode.FLOWSPEC, 4, costs, BudgetOverrides(max_tree=8, init_tokens=20))


@pytest.mark.parametrize(("given", "message"), [
    ({"segment": 0}, "segment must be >= 1"), ({"segment": True}, "takes an int"), ({"nope": 1}, "unknown budget"),
    ({"min_reach": 1.0}, r"min_reach must be in \[0, 1\)"), ({"draft_ahead": 1}, "takes a bool"),
    ({"lookup": -1}, "lookup must be >= 0"),
])
def test_budget_overrides_are_checked_as_they_are_built(given: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        BudgetOverrides.of(given)
