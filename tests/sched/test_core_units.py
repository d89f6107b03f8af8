"""Unit tests of the sans-IO pieces: sampling, tree growth, the stage's view, the scheduler's states."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flowspec.errors import LocalProtocolError, PeerProtocolError
from flowspec.sched.actions import EmitTokens, Finish, RunDraft, SendSegment
from flowspec.sched.budget import Budget, Mode
from flowspec.sched.events import (
    Cancelled,
    DraftError,
    DraftReady,
    Event,
    Prefilled,
    SegmentReturned,
    StageError,
    StageLost,
    StepTimedOut,
)
from flowspec.sched.growth import TreeGrowth
from flowspec.sched.sampling import SamplingParams, choose_token, uniform, warped_probs
from flowspec.sched.scheduler import RequestState, Scheduler
from flowspec.sched.stage import StageTree


def test_sched_imports_no_io_and_no_model_code() -> None:
    # torch itself pulls in asyncio and socket, so check sched's own imports, plus the package boundaries.
    code = (
        "import ast, pathlib, sys, flowspec.sched.scheduler, flowspec.sched.stage, flowspec.sched.growth\n"
        "bad = [m for m in ('flowspec.model', 'flowspec.net', 'flowspec.node') if m in sys.modules]\n"
        "for f in pathlib.Path('flowspec/sched').glob('*.py'):\n"
        "    for n in ast.walk(ast.parse(f.read_text())):\n"
        "        names = [a.name for a in n.names] if isinstance(n, ast.Import) else \\\n"
        "            [n.module or ''] if isinstance(n, ast.ImportFrom) else []\n"
        "        bad += [f'{f.name}:{m}' for m in names if m.split('.')[0] in ('asyncio', 'socket', 'selectors')]\n"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])


def test_uniform_is_a_pure_function_of_seed_and_position() -> None:
    assert uniform(3, 10) == uniform(3, 10)
    assert uniform(3, 10) != uniform(4, 10) and uniform(3, 10) != uniform(3, 11)
    values = [uniform(s, 5) for s in range(4000)]
    assert all(0 <= v < 1 for v in values)
    assert abs(sum(values) / len(values) - 0.5) < 0.02


def test_sampling_matches_the_warped_distribution_chi_square() -> None:
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    params = [SamplingParams(temperature=0.8, top_p=0.9, seed=s) for s in range(6000)]
    probs = warped_probs(logits, params[0])
    counts = torch.zeros(6)
    for p in params:
        counts[choose_token(logits, p, position=17)] += 1
    assert counts[probs == 0].sum() == 0  # nothing outside the nucleus
    expected = probs * len(params)
    mask = expected > 0
    chi2 = float((((counts - expected) ** 2)[mask] / expected[mask]).sum())
    assert chi2 < 20.5  # 99.9th percentile of chi-square with <= 5 degrees of freedom


def test_greedy_is_argmax_first_index_on_ties() -> None:
    assert choose_token(torch.tensor([0.0, 3.0, 3.0]), SamplingParams(), 0) == 1


@settings(max_examples=50, deadline=None)
@given(topk=st.integers(1, 4), depth=st.integers(0, 3), budget=st.integers(1, 20), seed=st.integers(0, 999))
def test_tree_growth_is_ancestor_closed_and_within_budget(topk: int, depth: int, budget: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    job = TreeGrowth(anchor_id=7, context=(1, 2), path_tokens=(3,), anchor_position=2, topk=topk, depth=depth,
                     budget=budget)
    while (request := job.next_request()) is not None:
        raw = torch.randn(len(request.tokens), 12, generator=gen)
        raw[:, 0] = 50.0  # ties: log-prob rounds to 0 for token 0 everywhere
        job.feed(torch.log_softmax(raw, -1))
    assert 1 <= len(job.candidates) <= budget
    for i, cand in enumerate(job.candidates):
        assert cand.parent_cand < i  # parents before children
        if cand.parent_cand < 0:
            assert cand.parent_id == 7
    siblings = {(c.parent_cand, c.token) for c in job.candidates}
    assert len(siblings) == len(job.candidates)  # no duplicate token under one parent


def test_stage_tree_refuses_out_of_order_and_unknown_commits() -> None:
    tree = StageTree(context_len=3)
    tree.apply_verdict(1, (), root=0, watermark=0)
    admission = tree.admit([0, 1, 2], [-1, 0, 0])
    assert admission.rows == (0, 1, 2)
    assert admission.visible is not None
    assert admission.visible.tolist() == [
        [True, True, True, True, False, False],
        [True, True, True, True, True, False],
        [True, True, True, True, False, True],
    ]
    with pytest.raises(PeerProtocolError, match="out of order"):
        tree.apply_verdict(3, (0,), root=2, watermark=2)
    with pytest.raises(PeerProtocolError, match="never computed"):
        tree.apply_verdict(2, (9,), root=2, watermark=2)
    compaction = tree.apply_verdict(2, (0,), root=2, watermark=2)
    assert compaction.start == 3 and compaction.keep == (3, 5)  # node 0 to context, then node 2; 1 died
    assert tree.slots == [2] and tree.context_len == 4
    late = tree.admit([3, 4], [1, 2])  # 3 hangs under the dead node 1
    assert late.rows == (1,)


def test_scheduler_state_machine_refuses_illegal_events() -> None:
    """An illegal event is our bug (LocalProtocolError) and, as in h11, leaves the request in ERROR for good:
    every later event is refused naming the first reason."""
    sched = Scheduler([1, 2], Budget(Mode.AR, 2), SamplingParams(), max_new_tokens=3)
    with pytest.raises(LocalProtocolError, match="not legal in state PREFILLING"):
        sched.handle(SegmentReturned(1, (), torch.zeros(0, 4)))
    assert sched.state is RequestState.ERROR and sched.done
    with pytest.raises(LocalProtocolError, match=r"not legal in state ERROR: .*SegmentReturned"):
        sched.handle(Prefilled(torch.tensor([0.0, 0.0, 5.0, 0.0])))


def test_a_segment_that_was_not_in_flight_is_the_stages_fault_and_sticks() -> None:
    sched = Scheduler([1, 2], Budget(Mode.AR, 2), SamplingParams(), max_new_tokens=3)
    sched.handle(Prefilled(torch.tensor([0.0, 0.0, 5.0, 0.0])))
    assert sched.state is RequestState.DECODING and sched.generated == [2]
    with pytest.raises(PeerProtocolError, match="segment 99 came back but was not in flight"):
        sched.handle(SegmentReturned(99, (), torch.zeros(0, 4)))
    assert sched.state is RequestState.ERROR and "not in flight" in (sched.error or "")
    assert sched.finish_reason is not None and sched.finish_reason.startswith("error:")
    with pytest.raises(LocalProtocolError, match="not legal in state ERROR"):
        sched.handle(Cancelled())


def test_a_segment_with_rows_it_never_carried_fails_the_request() -> None:
    sched = Scheduler([1, 2], Budget(Mode.AR, 2), SamplingParams(), max_new_tokens=3)
    (send,) = [a for a in sched.handle(Prefilled(torch.tensor([0.0, 0.0, 5.0, 0.0]))) if isinstance(a, SendSegment)]
    with pytest.raises(PeerProtocolError, match="never carried"):
        sched.handle(SegmentReturned(send.step, (send.ids[0] + 7,), torch.zeros(1, 4)))
    assert sched.state is RequestState.ERROR


@pytest.mark.parametrize(("event", "reason"), [
    (DraftError("RuntimeError('boom')"), "the drafter failed: RuntimeError('boom')"),
    (StepTimedOut(30.0), "no progress for 30 s: a stage is stalled or too slow (segments in flight: [1]"),
    (StageError(2, "compute", "out of memory"), "stage 2 reported compute: out of memory"),
])
def test_shell_failures_are_events_that_end_the_request(event: Event, reason: str) -> None:
    """Each failure the shell sees is an event: the request goes to ERROR with a reason and a Finish action,
    and no stage is named for replacement (only StageLost names one)."""
    sched = Scheduler([1, 2], Budget(Mode.AR, 2), SamplingParams(), max_new_tokens=3)
    sched.handle(Prefilled(torch.tensor([0.0, 0.0, 5.0, 0.0])))
    actions = sched.handle(event)
    assert sched.state is RequestState.ERROR and sched.lost_stage is None
    assert sched.error is not None and sched.error.startswith(reason)
    assert actions == [Finish(f"error: {sched.error}")]


def test_a_lost_stage_names_itself_for_the_shell_to_replace() -> None:
    sched = Scheduler([1, 2], Budget(Mode.AR, 2), SamplingParams(), max_new_tokens=3)
    sched.handle(StageLost(3, "connection reset"))
    assert sched.state is RequestState.ERROR and sched.lost_stage == 3


def test_late_failures_after_the_answer_change_nothing() -> None:
    sched = Scheduler([1, 2], Budget(Mode.AR, 2), SamplingParams(), max_new_tokens=1)
    sched.handle(Prefilled(torch.tensor([0.0, 0.0, 5.0, 0.0])))
    assert sched.state is RequestState.DONE and sched.finish_reason == "length"
    for late in (StepTimedOut(5.0), DraftError("x"), StageLost(1, "gone"), Cancelled()):
        assert sched.handle(late) == [] and sched.state is RequestState.DONE
    assert sched.error is None and sched.finish_reason == "length"


@pytest.mark.parametrize("from_leaf", [False, True])
def test_flowspec_expansion_anchor_is_the_new_root_or_the_best_leaf(from_leaf: bool) -> None:
    """A verdict that leaves too little unsent work triggers an expansion: under the new root by default, under
    the best-scored leaf of the surviving tree with `expand_from_leaf` (the likely path gets deeper)."""
    from tests.sched.harness import FakeDrafter, run_job

    budget = Budget(Mode.FLOWSPEC, 2, init_tokens=2, topk=1, depth=1, expand_tokens=2, expand_depth=1, segment=1,
                    expand_from_leaf=from_leaf)
    sched = Scheduler([1, 2, 3], budget, SamplingParams(), max_new_tokens=20)
    first = torch.zeros(16)
    first[5] = 1.0
    (job,) = [a.job for a in sched.handle(Prefilled(first)) if isinstance(a, RunDraft)]
    run_job(FakeDrafter(agreement=1.0, sharp=True), job)
    sent = [a for a in sched.handle(DraftReady(job)) if isinstance(a, SendSegment)]
    assert [len(a.ids) for a in sent] == [1, 1, 1]  # root, child, grandchild: every slot full, nothing unsent
    root, child, grandchild = (a.ids[0] for a in sent)
    assert sched.tree.nodes[grandchild].parent == child and sched.tree.nodes[child].parent == root
    # the root's segment returns and the target agrees with the child: the child becomes the root
    logits = torch.zeros(1, 16)
    logits[0, sched.tree.nodes[child].token] = 1.0
    actions = sched.handle(SegmentReturned(sent[0].step, (root,), logits))
    assert sched.tree.root_id == child
    (expansion,) = [a.job for a in actions if isinstance(a, RunDraft)]
    assert expansion.anchor_id == (grandchild if from_leaf else child)


def _peaked(token: int, rows: int = 0) -> torch.Tensor:
    """Logits whose argmax is `token` (`[16]`, or `[rows, 16]`)."""
    logits = torch.zeros(rows or 1, 16)
    logits[:, token] = 5.0
    return logits if rows else logits[0]


def _decoding_ar() -> tuple[Scheduler, SendSegment]:
    sched = Scheduler([1, 2], Budget(Mode.AR, 2), SamplingParams(), max_new_tokens=5)
    (segment,) = [a for a in sched.handle(Prefilled(_peaked(4))) if isinstance(a, SendSegment)]
    return sched, segment


@pytest.mark.parametrize("prefilled", [False, True])
def test_a_lost_stage_is_a_sticky_error_that_names_the_stage(prefilled: bool) -> None:
    sched = _decoding_ar()[0] if prefilled else Scheduler([1, 2], Budget(Mode.AR, 2), SamplingParams(), 5)
    assert sched.handle(StageLost(2, "connection reset")) == [Finish("error: stage 2 lost: connection reset")]
    assert sched.state is RequestState.ERROR and sched.done and sched.idle
    assert sched.lost_stage == 2 and sched.error == "stage 2 lost: connection reset"
    assert sched.finish_reason == "error: stage 2 lost: connection reset"
    assert sched.live_rows([0, 1]) == []
    for event in (SegmentReturned(1, (), torch.zeros(0, 16)), Cancelled(), StageLost(1, "again")):
        name = type(event).__name__
        with pytest.raises(LocalProtocolError, match=f"{name} is not legal in state ERROR.*connection reset"):
            sched.handle(event)
    assert sched.lost_stage == 2 and sched.error == "stage 2 lost: connection reset"  # the first failure stays


def test_a_stage_error_fails_the_request_without_a_lost_stage() -> None:
    sched, _ = _decoding_ar()
    assert sched.handle(StageError(1, "oom", "cache full")) == [Finish("error: stage 1 reported oom: cache full")]
    assert sched.state is RequestState.ERROR and sched.lost_stage is None
    with pytest.raises(LocalProtocolError, match="DraftReady is not legal in state ERROR.*cache full"):
        sched.handle(DraftReady(TreeGrowth(anchor_id=0, context=())))


@pytest.mark.parametrize("prefilled", [False, True])
def test_cancel_finishes_a_live_request_and_late_events_change_nothing(prefilled: bool) -> None:
    if prefilled:
        sched, segment = _decoding_ar()
    else:
        sched = Scheduler([1, 2], Budget(Mode.AR, 2), SamplingParams(), max_new_tokens=5)
    assert sched.handle(Cancelled()) == [Finish("cancelled")]
    assert sched.state is RequestState.DONE and sched.finish_reason == "cancelled" and sched.idle
    assert sched.handle(Cancelled()) == []
    assert sched.handle(StageLost(1, "late")) == [] and sched.handle(StageError(1, "x", "late")) == []
    if prefilled:  # the segment still in flight comes back late: settled in the ledger, not verified
        assert sched.handle(SegmentReturned(segment.step, segment.ids, _peaked(7, rows=1))) == []
        assert sched.generated == [4] and not sched.in_flight
        assert sched.state is RequestState.DONE and sched.finish_reason == "cancelled" and sched.lost_stage is None
        with pytest.raises(PeerProtocolError, match="not in flight"):  # the last stage sent it twice
            sched.handle(SegmentReturned(segment.step, segment.ids, _peaked(7, rows=1)))
        assert sched.state is RequestState.ERROR and sched.finish_reason == "cancelled"  # the answer stands
        return
    assert sched.state is RequestState.DONE and sched.finish_reason == "cancelled" and sched.lost_stage is None


def test_cancel_after_eos_keeps_the_finish_reason() -> None:
    sched = Scheduler([1, 2], Budget(Mode.AR, 2), SamplingParams(), max_new_tokens=5, eos_ids=[4])
    assert sched.handle(Prefilled(_peaked(4))) == [EmitTokens((4,)), Finish("eos")]
    assert sched.handle(Cancelled()) == []
    assert sched.finish_reason == "eos"


def test_shell_queries_live_rows_idle_and_what_the_request_waits_for() -> None:
    sched = Scheduler([1, 2], Budget(Mode.AR, 2), SamplingParams(), max_new_tokens=3)
    assert not sched.idle and sched.describe_waiting() == "waiting for the prefill"
    (first,) = [a for a in sched.handle(Prefilled(_peaked(4))) if isinstance(a, SendSegment)]
    (root,) = first.ids
    assert not sched.idle and sched.describe_waiting() == f"segments in flight: [{first.step}]; draft job running: False"
    assert sched.live_rows([root + 50, root, root]) == [1, 2]  # an id never created is not live
    actions = sched.handle(SegmentReturned(first.step, (root,), _peaked(5, rows=1)))
    (second,) = [a for a in actions if isinstance(a, SendSegment)]
    assert sched.live_rows([root, second.ids[0]]) == [1]  # the committed root needs no logits any more
    assert sched.describe_waiting() == f"segments in flight: [{second.step}]; draft job running: False"
    sched.handle(SegmentReturned(second.step, second.ids, _peaked(6, rows=1)))
    assert sched.done and sched.idle and sched.live_rows(second.ids) == [] and sched.generated == [4, 5, 6]


def test_a_draft_whose_anchor_got_committed_meanwhile_grows_the_new_root() -> None:
    """The root goes out before its tree (eager_root) and is verified while the drafter still works on it: the
    candidate carrying the committed token stands for the new root, and its child becomes the root's child."""
    budget = Budget(Mode.FLOWSPEC, 2, init_tokens=2, topk=1, depth=1, eager_root=True)
    sched = Scheduler([1, 2, 3], budget, SamplingParams(), max_new_tokens=20)
    actions = sched.handle(Prefilled(_peaked(5)))
    (job,) = [a.job for a in actions if isinstance(a, RunDraft)]
    (sent,) = [a for a in actions if isinstance(a, SendSegment)]
    assert sched.describe_waiting() == f"segments in flight: [{sent.step}]; draft job running: True"
    old_root = sent.ids[0]
    sched.handle(SegmentReturned(sent.step, (old_root,), _peaked(9, rows=1)))  # the target commits 9
    assert sched.generated == [5, 9] and not sched.tree.is_live(old_root)
    assert sched.draft_useful(job)  # its anchor was committed, so its drafts may still fit
    while (request := job.next_request()) is not None:  # the drafter guesses 9, then 11
        job.feed(torch.log_softmax(_peaked(9 if len(job.candidates) == 0 else 11, rows=len(request.tokens)), -1))
    assert [c.token for c in job.candidates] == [9, 11]
    sched.handle(DraftReady(job))
    root = sched.tree.root
    assert root.token == 9 and list(root.children) == [11]
    assert sched.tree.nodes[root.children[11]].position == root.position + 1


def test_pop_best_keeps_long_shots_queued_below_the_floor() -> None:
    """After a segment's first node, only nodes scoring at least the floor go out; the rest stay queued."""
    import math

    from flowspec.sched.tree import DraftTree

    tree = DraftTree()
    root = tree.new_root(1, 0)
    likely = tree.add_child(root.id, 2, math.log(0.9))
    tree.add_child(root.id, 3, math.log(0.05))
    tree.add_child(likely.id, 4, math.log(0.8))
    floor = root.score + math.log(0.2)
    assert [n.token for n in tree.pop_best(4, floor)] == [1, 2, 4]
    assert tree.unsent_count() == 1 and abs(tree.reach(likely.id) - 0.9) < 1e-12
    assert [n.token for n in tree.pop_best(4, floor)] == [3]  # a segment's first node always goes


def test_the_state_diagram_in_the_docs_is_generated_from_the_table() -> None:
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, str(root / "scripts" / "make_state_diagram.py"), "--check"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


_EVENTS = [
    Prefilled(torch.tensor([0.0, 0.0, 5.0, 0.0])),
    Prefilled(torch.tensor([0.0, 0.0, 0.0, 5.0])),  # eos
    SegmentReturned(1, (), torch.zeros(0, 4)),
    SegmentReturned(2, (), torch.zeros(0, 4)),
    StageLost(1, "gone"), StageError(2, "compute", "oom"), DraftError("boom"), StepTimedOut(1.0), Cancelled(),
]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(range(len(_EVENTS))), max_size=8))
def test_every_state_change_is_one_the_table_allows(picks: list[int]) -> None:
    """Whatever events arrive in whatever order, each handled one moves the request along an edge of
    TRANSITIONS, and each refused one (an exception) leaves it in ERROR for good."""
    from flowspec.sched.scheduler import TRANSITIONS

    sched = Scheduler([1, 2], Budget(Mode.AR, 2), SamplingParams(), max_new_tokens=4, eos_ids=[3])
    for pick in picks:
        event, before = _EVENTS[pick], sched.state
        try:
            sched.handle(event)
        except (LocalProtocolError, PeerProtocolError):
            assert sched.state is RequestState.ERROR and sched.error
            continue
        assert sched.state in TRANSITIONS[(before, type(event))].values()


@pytest.mark.parametrize("mode", list(Mode))
def test_policies_keep_no_state_of_their_own(mode: Mode) -> None:
    """Only the scheduler changes state: a policy holds its view and nothing else, through a whole request."""
    from tests.sched.harness import FakeDrafter, run_job

    budget = Budget(mode, 2, init_tokens=4, topk=2, depth=1, expand_tokens=2, expand_depth=1, segment=2)
    sched = Scheduler([1, 2, 3], budget, SamplingParams(), max_new_tokens=6)
    drafter, queue = FakeDrafter(agreement=1.0, sharp=True), list(sched.handle(Prefilled(_peaked(5))))
    while queue and not sched.done:
        action = queue.pop(0)
        if isinstance(action, RunDraft):
            run_job(drafter, action.job)
            queue += sched.handle(DraftReady(action.job))
        elif isinstance(action, SendSegment):
            queue += sched.handle(SegmentReturned(action.step, action.ids, _peaked(5, rows=len(action.ids))))
    assert sched.state is RequestState.DONE
    policy = sched._policy
    assert not hasattr(policy, "__dict__") or set(vars(policy)) == {"view"}
