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
from flowspec.sched.budget import Budget, Mode
from flowspec.sched.events import Prefilled, SegmentReturned
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
    sched = Scheduler([1, 2], Budget(Mode.AR, 2), SamplingParams(), max_new_tokens=3)
    with pytest.raises(LocalProtocolError, match="not legal in state PREFILLING"):
        sched.handle(SegmentReturned(1, (), torch.zeros(0, 4)))
    sched.handle(Prefilled(torch.tensor([0.0, 0.0, 5.0, 0.0])))
    assert sched.state is RequestState.DECODING and sched.generated == [2]
    with pytest.raises(LocalProtocolError, match="not in flight"):
        sched.handle(SegmentReturned(99, (), torch.zeros(0, 4)))


@pytest.mark.parametrize("from_leaf", [False, True])
def test_flowspec_expansion_anchor_is_the_new_root_or_the_best_leaf(from_leaf: bool) -> None:
    """A verdict that leaves too little unsent work triggers an expansion: under the new root by default, under
    the best-scored leaf of the surviving tree with `expand_from_leaf` (the likely path gets deeper)."""
    from flowspec.sched.actions import RunDraft, SendSegment
    from flowspec.sched.events import DraftReady
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
