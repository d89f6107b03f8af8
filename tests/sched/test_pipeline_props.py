"""Property tests: the sans-IO core, driven through FakePipeline under adversarial interleavings."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from flowspec.sched.actions import Finish
from flowspec.sched.budget import Mode
from flowspec.sched.events import StageLost
from flowspec.sched.sampling import SamplingParams
from flowspec.sched.scheduler import RequestState
from tests.sched.harness import FakePipeline, budget_for, sequential_oracle

MODES = [Mode.AR, Mode.CHUNK, Mode.PIPEDEC, Mode.FLOWSPEC]


@settings(max_examples=60, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate], suppress_health_check=[HealthCheck.too_slow])
@given(
    mode=st.sampled_from(MODES),
    stages=st.integers(1, 5),
    agreement=st.sampled_from([0.0, 0.5, 0.9, 1.0]),
    prompt=st.lists(st.integers(0, 15), min_size=1, max_size=6),
    topk=st.integers(1, 3),
    depth=st.integers(0, 3),
    segment=st.integers(1, 5),
    from_leaf=st.booleans(),
    ahead=st.booleans(),
    lookup=st.integers(0, 4),
    min_reach=st.sampled_from([0.0, 0.3]),
    schedule_seed=st.integers(0, 2**32 - 1),
)
def test_greedy_output_equals_sequential_under_any_interleaving(
    mode: Mode, stages: int, agreement: float, prompt: list[int], topk: int, depth: int, segment: int,
    from_leaf: bool, ahead: bool, lookup: int, min_reach: float, schedule_seed: int,
) -> None:
    budget = budget_for(mode, stages, topk=topk, depth=depth, expand_depth=depth, segment=segment,
                        width=topk, init_tokens=8, expand_tokens=6, expand_from_leaf=from_leaf,
                        draft_ahead=ahead, lookup=lookup, min_reach=min_reach)
    sampling = SamplingParams()
    pipe = FakePipeline(prompt, budget, sampling, max_new_tokens=24, agreement=agreement, eos=(7,))
    rng = random.Random(schedule_seed)
    out = pipe.run(lambda n: rng.randrange(n))  # invariants I1-I8 are checked after every move
    assert out == sequential_oracle(prompt, sampling, 24, eos=(7,))


@settings(max_examples=30, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(
    mode=st.sampled_from(MODES),
    stages=st.integers(1, 4),
    seed=st.integers(0, 10_000),
    temperature=st.sampled_from([0.7, 1.0, 1.5]),
    top_p=st.sampled_from([1.0, 0.9]),
    schedule_seed=st.integers(0, 2**32 - 1),
)
def test_sampled_output_is_the_seeded_sequential_sample(
    mode: Mode, stages: int, seed: int, temperature: float, top_p: float, schedule_seed: int
) -> None:
    sampling = SamplingParams(temperature=temperature, top_p=top_p, seed=seed)
    budget = budget_for(mode, stages)
    pipe = FakePipeline([1, 2, 3], budget, sampling, max_new_tokens=16, agreement=0.8, sharp=False)
    rng = random.Random(schedule_seed)
    assert pipe.run(lambda n: rng.randrange(n)) == sequential_oracle([1, 2, 3], sampling, 16, sharp=False)


@pytest.mark.parametrize("mode", MODES)
def test_perfect_draft_pays_off_in_every_speculative_mode(mode: Mode) -> None:
    budget = budget_for(mode, 4, topk=2, depth=3, init_tokens=8, expand_tokens=6, segment=4)
    pipe = FakePipeline([5], budget, SamplingParams(), max_new_tokens=40, agreement=1.0)
    rng = random.Random(7)
    pipe.run(lambda n: rng.randrange(n))
    stats = pipe.sched.stats
    if mode is Mode.AR:
        assert stats.mean_accepted == 1.0
    elif mode is Mode.PIPEDEC:  # one layer per step: at most one token per verification, but every step
        assert stats.mean_accepted == 1.0 and stats.committed / stats.steps > 0.5, stats
    else:
        assert stats.mean_accepted > 1.5, stats


def test_flowspec_keeps_the_pipeline_full() -> None:
    """With a perfect drafter every slot stays occupied: steps >> verifications x 1 segment."""
    budget = budget_for(Mode.FLOWSPEC, 4, topk=2, depth=3, init_tokens=10, expand_tokens=8, segment=3)
    pipe = FakePipeline([5], budget, SamplingParams(), max_new_tokens=60, agreement=1.0)
    rng = random.Random(1)
    pipe.run(lambda n: rng.randrange(n))
    stats = pipe.sched.stats
    assert stats.committed + 1 == 60
    assert stats.committed / stats.steps > 0.5  # tokens per pipeline step well above AR's 1 / (N + 1)


def test_stage_memory_stays_bounded_over_a_long_generation() -> None:
    budget = budget_for(Mode.FLOWSPEC, 3)
    pipe = FakePipeline([1], budget, SamplingParams(), max_new_tokens=400, agreement=0.6)
    rng = random.Random(3)
    pipe.run(lambda n: rng.randrange(n), max_moves=200_000)
    assert pipe.max_cache <= 1 + 400 + budget.tree_slack


@settings(max_examples=40, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(
    mode=st.sampled_from(MODES),
    stages=st.integers(1, 4),
    lose_after=st.integers(1, 300),
    temperature=st.sampled_from([0.0, 1.0]),
    schedule_seed=st.integers(0, 2**32 - 1),
)
def test_resuming_after_a_lost_pipeline_continues_the_same_output(
    mode: Mode, stages: int, lose_after: int, temperature: float, schedule_seed: int
) -> None:
    """A stage dies at an arbitrary moment: everything in flight is lost, the committed tokens are re-prefilled
    on a fresh pipeline and decoding resumes; the output is the one of a fault-free run."""
    sampling = SamplingParams(temperature=temperature, seed=5)
    budget = budget_for(mode, stages)
    prompt = [3, 1, 4]
    rng = random.Random(schedule_seed)
    first = FakePipeline(prompt, budget, sampling, max_new_tokens=30, agreement=0.7, sharp=temperature == 0)
    for _ in range(lose_after):
        if first.finished:
            break
        first.moves()[rng.randrange(len(first.moves()))]()
    out = list(first.output)
    if not first.finished:
        lost = stages  # the shell reports the loss; the scheduler names the stage so the shell can resume
        assert first.sched.handle(StageLost(lost, "link reset")) == [Finish(f"error: stage {lost} lost: link reset")]
        assert first.sched.state is RequestState.ERROR and first.sched.lost_stage == lost
        second = FakePipeline(first.sched.committed, budget, sampling, max_new_tokens=30, agreement=0.7,
                              sharp=temperature == 0, resume_prompt_len=len(prompt))
        out += second.run(lambda n: rng.randrange(n))
    assert out == sequential_oracle(prompt, sampling, 30, sharp=temperature == 0)


def _copying_target(period: int):  # type: ignore[no-untyped-def]
    """A target that repeats the token `period` back: its text copies itself, as a summary copies a passage."""
    import torch

    from tests.sched.harness import VOCAB

    def logits(sequence, sharp=True):  # type: ignore[no-untyped-def]
        out = torch.zeros(VOCAB)
        out[sequence[-period] if len(sequence) >= period else 0] = 10.0
        return out

    return logits


@pytest.mark.parametrize("ahead", [False, True])
def test_prompt_lookup_gains_depth_where_the_text_copies_itself(monkeypatch: pytest.MonkeyPatch,
                                                                  ahead: bool) -> None:
    """With a drafter that is always wrong, only looked-up tokens can be accepted: the copy is found, scored up
    and verified several tokens at a time, and the output is still exactly sequential decoding's."""
    import tests.sched.harness as harness

    monkeypatch.setattr(harness, "target_logits", _copying_target(5))
    prompt = [1, 2, 3, 4, 5, 6, 1, 2, 3]
    results = {}
    for lookup in (0, 6):
        budget = budget_for(Mode.FLOWSPEC, 3, lookup=lookup, draft_ahead=ahead, expand_from_leaf=ahead)
        pipe = FakePipeline(prompt, budget, SamplingParams(), max_new_tokens=40, agreement=0.0)
        rng = random.Random(5)
        assert pipe.run(lambda n: rng.randrange(n)) == harness.sequential_oracle(prompt, SamplingParams(), 40)
        results[lookup] = pipe.sched.stats
    with_lookup, without = results[6], results[0]
    assert without.lookup_proposed == 0 and without.mean_accepted < 1.2
    assert with_lookup.lookup_accepted > 20 and with_lookup.mean_accepted > 1.8, with_lookup
