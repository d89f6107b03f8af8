"""`flowspec bench`'s plan: built once from the arguments, with the product's rules (no copies of them)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from flowspec.bench.command import BenchPlan, bench_args
from flowspec.errors import ConfigError
from flowspec.sched import SamplingParams, SendSegment, largest_segment
from tests.sched.harness import FakePipeline


@pytest.fixture()
def prompts(tmp_path: Path) -> Path:
    folder = tmp_path / "prompts"
    folder.mkdir()
    (folder / "a.jsonl").write_text(json.dumps({"question_id": 1, "turns": ["Name three colours."]}) + "\n")
    return folder


def plan(prompts: Path, *argv: str) -> BenchPlan:
    return BenchPlan.from_args(bench_args(["--prompts", str(prompts), "--out", str(prompts.parent / "out"), *argv]))


class _Recording(FakePipeline):
    """The fake pipeline, noting how many rows each segment the scheduler sends carries."""

    sizes: list[int]

    def _apply(self, actions: list[object]) -> None:
        self.sizes = getattr(self, "sizes", [])
        self.sizes += [len(a.ids) for a in actions if isinstance(a, SendSegment)]
        super()._apply(actions)


def _largest_sent(plan: BenchPlan, mode: str) -> int:
    """The largest segment the mode's policy really sends, over a few whole requests in any interleaving."""
    largest = 0
    for seed in range(3):
        pipe = _Recording([1, 2, 3, 4, 5], plan.budget(mode), SamplingParams(), max_new_tokens=24, agreement=0.9)
        pipe.run(random.Random(seed).randrange)
        largest = max(largest, *pipe.sizes)
    return largest


@pytest.mark.parametrize(("mode", "argv"), [
    ("ar", ["--stages", "3"]),
    ("chunk", ["--stages", "2"]), ("chunk", ["--stages", "4", "--tree-tokens", "20"]),
    ("pipedec", ["--stages", "2"]), ("pipedec", ["--stages", "3", "--width", "5"]),
    ("flowspec", ["--stages", "2"]), ("flowspec", ["--stages", "3", "--segment", "6"]),
    ("flowspec", ["--stages", "2", "--profile", "jetson-7b", "--min-reach", "0"]),
])
def test_the_bench_calibrates_for_the_segments_the_policy_sends(prompts: Path, mode: str, argv: list[str]) -> None:
    p = plan(prompts, "--modes", mode, *argv)
    assert p.segment_rows == largest_segment(p.budget(mode)) == _largest_sent(p, mode)


def test_the_bench_calibrates_for_its_largest_mode(prompts: Path) -> None:
    p = plan(prompts, "--modes", "ar,chunk,pipedec,flowspec", "--stages", "2", "--segment", "7", "--width", "2")
    assert p.segment_rows == 7 == max(largest_segment(p.budget(m)) for m in p.pipeline)
    assert plan(prompts, "--modes", "hf", "--stages", "2").segment_rows == 1  # no pipeline mode


def test_the_plan_refuses_a_draft_as_the_drafter_does(prompts: Path) -> None:
    from flowspec.store import DraftSpec

    with pytest.raises(ConfigError) as parsed:
        DraftSpec.parse("self:layerz=3")
    with pytest.raises(ConfigError) as planned:
        plan(prompts, "--modes", "flowspec", "--draft", "self:layerz=3")
    assert str(planned.value) == str(parsed.value)
    assert plan(prompts, "--modes", "hf-assisted", "--draft", "self:layers=4").draft == DraftSpec("self", 4)
    assert plan(prompts, "--modes", "ar,hf", "--draft", "self:layerz=3").draft is None  # no mode drafts


def test_the_plan_parses_the_run_once_and_leaves_the_namespace_as_parsed(prompts: Path) -> None:
    """The plan holds the parsed run (D, calibrated or given, is the testbed's); nothing patches the Namespace."""
    args = bench_args(["--prompts", str(prompts), "--out", str(prompts.parent / "out"), "--profile", "jetson-7b",
                       "--link", "150mbit,1ms", "--concurrency", "1,2", "--layers", "20,10", "--stages", "2"])
    p = BenchPlan.from_args(args)
    assert args.dilation is None and p.dilation is None  # calibrated later, by the testbed
    assert (p.concurrency, p.layers, p.profile_arg, p.link_arg) == ((1, 2), [20, 10], "jetson-7b", "150mbit,1ms")
    assert p.profile is not None and p.profile.name == "jetson-7b" and p.link is not None
    assert p.stats_file(2) == str(prompts.parent / "out" / "stage-2.stats.jsonl")


@pytest.mark.parametrize(("argv", "message"), [
    (["--modes", "ar,nope"], "unknown mode"),
    (["--modes", "ar,hf", "--concurrency", "2"], "drop hf/hf-assisted"),
    (["--modes", "hf-assisted", "--draft", "random"], "hf-assisted cannot use the random draft"),
    (["--link", "gbe"], "give a --profile too"), (["--profile", "no-such-device"], "unknown device profile"),
])
def test_bad_arguments_are_refused_before_anything_loads(prompts: Path, argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        plan(prompts, *argv)
    assert not (prompts.parent / "out").exists()
