"""Calibration arithmetic without a model: the median of each item's samples sets D, so one disturbed sample
(another process took the core) cannot stretch a whole bench run."""

from __future__ import annotations

from collections.abc import Iterator

from hypothesis import given
from hypothesis import strategies as st

from flowspec.bench.calibrate import dilation_from, time_samples

COSTS = {"stage_forward_1": 0.060, "lm_head_4": 0.008, "draft_level_3": 0.015}


def _steady(ms: dict[str, float], reps: int = 7) -> dict[str, list[float]]:
    return {what: [v / 1e3] * reps for what, v in ms.items()}


def test_one_huge_outlier_does_not_change_d() -> None:
    base = _steady({"stage_forward_1": 30.0, "lm_head_4": 20.0, "draft_level_3": 60.0})
    noisy = {what: list(xs) for what, xs in base.items()}
    noisy["stage_forward_1"][3] = 10.0  # one 10 s sample: the old best-of-3 survives this, a mean would not
    noisy["draft_level_3"][0] = 1e-6  # and one absurdly fast one: min-of-n would let it set the ratio
    clean, disturbed = dilation_from(base, COSTS, 1.3), dilation_from(noisy, COSTS, 1.3)
    assert disturbed.dilation == clean.dilation == 5.2  # 60 ms / 15 ms × 1.3
    assert disturbed.binding == "draft_level_3"
    assert disturbed.spread_ms["stage_forward_1"] == (30.0, 30.0, 10000.0)


def test_the_median_counts_not_the_fastest_sample() -> None:
    samples = {"draft_level_3": [0.015, 0.015, 0.015, 0.045, 0.045, 0.045, 0.045]}
    cal = dilation_from(samples, {"draft_level_3": 0.015}, 1.0)
    assert cal.ratios["draft_level_3"] == 3.0 and cal.dilation == 3.0


def test_dilation_is_rounded_up_and_at_least_one() -> None:
    assert dilation_from({"x": [0.001] * 3}, {"x": 0.1}, 1.3).dilation == 1.0
    cal = dilation_from({"x": [0.1049] * 3}, {"x": 0.01}, 1.0)  # 10.49 rounds down to 10: take 11
    assert cal.dilation == 11.0 and cal.dilation >= max(cal.ratios.values())


@given(st.lists(st.floats(1e-4, 1.0), min_size=3, max_size=15).filter(lambda xs: len(xs) % 2 == 1),
       st.data(), st.floats(1.0, 1e4))
def test_any_single_outlier_costs_no_more_than_a_slowest_sample(xs: list[float], data: st.DataObject,
                                                               huge: float) -> None:
    """An odd count of samples: one of them replaced by anything slower than all the rest gives the same D as
    replacing it by the slowest of the others, however large it is."""
    i = data.draw(st.integers(0, len(xs) - 1))
    others = xs[:i] + xs[i + 1:]
    tame = dilation_from({"x": others + [max(others)]}, {"x": 0.01}, 1.3)
    wild = dilation_from({"x": others + [max(others) + huge]}, {"x": 0.01}, 1.3)
    assert wild.dilation == tame.dilation and wild.ratios == tame.ratios


def test_time_samples_warms_up_then_times_each_call() -> None:
    calls = []
    ticks: Iterator[float] = iter([0.0, 1.0, 10.0, 12.0, 20.0, 23.0])  # start/stop pairs: 1, 2, 3 s

    def fn() -> None:
        calls.append(1)

    assert time_samples(fn, 3, timer=lambda: next(ticks)) == [1.0, 2.0, 3.0]
    assert len(calls) == 4  # the warm-up call is not timed
