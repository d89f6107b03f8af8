"""V1's idle time after each verdict, on hand-made intervals (seconds on one clock)."""

from __future__ import annotations

from pathlib import Path

import pytest

from flowspec.bench.timeline import idle_after_verdicts, plot_timeline

V1 = [(0.0, 1.0, 0), (2.0, 3.0, 1), (3.0, 3.5, 2), (6.0, 7.0, 3)]


def test_idle_counts_from_the_verdict_when_v1_was_waiting() -> None:
    assert idle_after_verdicts([1.5], V1) == [0.5]  # idle from 1.5 until step 1 starts at 2.0
    assert idle_after_verdicts([1.0], V1) == [1.0]  # an interval ending at t does not cover it


def test_idle_counts_from_the_end_of_the_work_running_at_the_verdict() -> None:
    assert idle_after_verdicts([2.5], V1) == [0.0]  # busy till 3.0, next step starts right then
    assert idle_after_verdicts([3.0], V1) == [2.5]  # step 2 covers 3.0 (till 3.5), next at 6.0
    assert idle_after_verdicts([3.2], V1) == [2.5]


def test_verdicts_after_the_last_work_are_left_out() -> None:
    assert idle_after_verdicts([6.5, 7.0, 9.0], V1) == []
    assert idle_after_verdicts([0.5, 1.5, 6.5], V1) == [1.0, 0.5]
    assert idle_after_verdicts([1.5], []) == []


def test_interval_order_does_not_matter() -> None:
    assert idle_after_verdicts([1.5, 3.2], list(reversed(V1))) == pytest.approx([0.5, 2.5])


def test_timeline_marks_verdicts(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    path = tmp_path / "t.png"
    plot_timeline(path, {1: V1}, [(0.0, 0.5, "lm_head"), (1.0, 1.4, "draft")], 0.0, 7.0, dilation=2.0,
                  verdicts=[1.5, 3.2])
    assert path.stat().st_size > 1000
