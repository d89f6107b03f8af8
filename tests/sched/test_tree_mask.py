"""The one mask builder against brute force: row i sees column j iff j is context or an ancestor-or-self of i.

`TreeMask` is driven by random extends, prunes (`keep`) and truncations; `StageTree` by random segments and
verdicts. Both are compared, after every step, with a reference that walks explicit parent pointers.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flowspec.errors import LocalProtocolError
from flowspec.sched.stage import StageTree
from flowspec.treemask import TreeMask, causal_visible, tree_visible

SETTINGS = settings(max_examples=150, deadline=None)


def lineage(node: int, parent: dict[int, int]) -> set[int]:
    """node and every ancestor of it (parent -1: the context)."""
    seen = set()
    while node != -1:
        seen.add(node)
        node = parent[node]
    return seen


def reference(context_len: int, slots: list[int], rows: list[int], parent: dict[int, int]) -> torch.Tensor:
    """bool [len(rows), context_len + len(slots)] by the definition, for the nodes `rows` (all held in slots)."""
    vis = torch.zeros(len(rows), context_len + len(slots), dtype=torch.bool)
    for i, node in enumerate(rows):
        up = lineage(node, parent)
        for j in range(context_len + len(slots)):
            vis[i, j] = j < context_len or slots[j - context_len] in up
    return vis


class RefMask:
    """TreeMask's reference: slot -> node id, node id -> parent id; ids never reused, so pruning is a filter."""

    def __init__(self) -> None:
        self.slots: list[int] = []
        self.parent: dict[int, int] = {}

    def extend(self, parents: list[int]) -> None:
        for p in parents:
            node = len(self.parent)
            self.parent[node] = self.slots[p] if p >= 0 else -1
            self.slots.append(node)

    def visible(self, context_len: int, new: int) -> torch.Tensor:
        return reference(context_len, self.slots, self.slots[len(self.slots) - new :], self.parent)


@st.composite
def parent_batches(draw: st.DrawFn, size: int) -> list[int]:
    n = draw(st.integers(1, 8))
    return [draw(st.integers(-1, size + i - 1)) for i in range(n)]


@SETTINGS
@given(st.data(), st.integers(0, 5))
def test_tree_mask_matches_reference_through_extends_prunes_and_truncations(data: st.DataObject, ctx: int) -> None:
    mask, ref = TreeMask(), RefMask()
    for _ in range(data.draw(st.integers(1, 8))):
        op = data.draw(st.sampled_from(["extend", "extend", "keep", "truncate"]))
        if op == "extend":
            parents = data.draw(parent_batches(len(mask)))
            mask.extend(parents)
            ref.extend(parents)
            assert torch.equal(mask.visible(ctx, len(parents)), ref.visible(ctx, len(parents)))
        elif op == "keep":
            kept = sorted(data.draw(st.sets(st.integers(0, max(len(mask) - 1, 0)))) if len(mask) else [])
            mask.keep(kept)
            ref.slots = [ref.slots[i] for i in kept]
        else:
            n = data.draw(st.integers(0, len(mask)))
            mask.truncate(n)
            ref.slots = ref.slots[:n]
        assert len(mask) == len(ref.slots)
        assert torch.equal(mask.visible(ctx, len(mask)), ref.visible(ctx, len(ref.slots)))


@SETTINGS
@given(st.integers(0, 6), st.integers(0, 6), st.data())
def test_pending_rows_are_causal_and_scratch_rows_see_them(ctx: int, m: int, data: st.DataObject) -> None:
    """The drafter's forward: m pending context rows at [ctx, ctx + m), then a fresh tree after them."""
    parents = data.draw(parent_batches(0))
    mask = TreeMask()
    mask.extend(parents)
    vis = mask.visible(ctx, len(parents), causal_rows=m)
    tree = RefMask()
    tree.extend(parents)
    assert vis.shape == (m + len(parents), ctx + m + len(parents))
    for r in range(m):  # pending row r: the context, pending rows 0..r, no tree slot
        assert vis[r].tolist() == [j <= ctx + r for j in range(vis.shape[1])]
    assert torch.equal(vis[m:], tree.visible(ctx + m, len(parents)))


@given(st.integers(0, 6), st.integers(0, 6))
def test_causal_is_a_chain(cache_len: int, n: int) -> None:
    want = torch.zeros(n, cache_len + n, dtype=torch.bool)
    for i in range(n):
        want[i, : cache_len + i + 1] = True
    assert torch.equal(causal_visible(cache_len, n), want)
    assert torch.equal(tree_visible(cache_len, list(range(-1, n - 1))), want)


def test_bad_input_is_refused_and_leaves_the_mask_alone() -> None:
    mask = TreeMask()
    mask.extend([-1, 0])
    with pytest.raises(LocalProtocolError, match="parent 3 of tree slot 3 must be -1 or an earlier slot"):
        mask.extend([1, 3])
    with pytest.raises(LocalProtocolError, match="parent -2"):
        mask.extend([-2])
    assert len(mask) == 2
    for bad in ([1, 0], [0, 0], [2], [-1]):
        with pytest.raises(LocalProtocolError, match="strictly increasing"):
            mask.keep(bad)
    with pytest.raises(LocalProtocolError, match="truncate"):
        mask.truncate(3)
    with pytest.raises(LocalProtocolError, match="pending rows"):
        mask.visible(0, 1, causal_rows=2)  # an older slot would sit before the pending rows
    with pytest.raises(LocalProtocolError, match="new=3"):
        mask.visible(0, 3)
    assert len(mask) == 2 and mask.visible(1, 2).tolist() == [[True, True, False], [True, True, True]]


@SETTINGS
@given(st.data())
def test_stage_tree_admissions_match_reference(data: st.DataObject) -> None:
    """Random segments (some rows hanging under dead or unknown nodes) and verdicts (random commits and prunes)."""
    tree = StageTree(context_len=data.draw(st.integers(0, 4)))
    forest: dict[int, int] = {}  # every admitted id -> its parent id (-1: the round's root)
    next_id, seq = 0, 1
    tree.apply_verdict(seq, (), root=0, watermark=data.draw(st.integers(-1, 3)))  # round 1 starts at node 0
    for _ in range(data.draw(st.integers(1, 10))):
        if data.draw(st.booleans()) or not tree.slots:
            n = data.draw(st.integers(1, 6))
            ids = list(range(next_id, next_id + n))
            next_id += n
            pool = [*tree.slots, *ids, next_id + 50]  # held, this segment, and an id that never arrives
            parents = [data.draw(st.sampled_from([*pool[: len(tree.slots) + i], next_id + 50])) for i in range(n)]
            held = set(tree.slots)
            want_rows = []
            for row, (node, parent) in enumerate(zip(ids, parents)):
                if node == tree.root or parent in held:
                    want_rows.append(row)
                    held.add(node)
                    forest[node] = -1 if node == tree.root else parent
            adm = tree.admit(ids, parents)
            assert list(adm.rows) == want_rows
            if want_rows:
                assert adm.visible is not None
                want = reference(tree.context_len, tree.slots, [ids[r] for r in want_rows], forest)
                assert torch.equal(adm.visible, want)
            else:
                assert adm.visible is None
        else:
            commit = data.draw(st.lists(st.sampled_from(tree.slots), unique=True, max_size=3))
            root = data.draw(st.sampled_from([next_id, *tree.slots]))
            watermark = data.draw(st.integers(-1, next_id))
            before = [n for n in tree.slots if n not in commit]
            seq += 1
            comp = tree.apply_verdict(seq, commit, root, watermark)
            assert set(tree.slots) <= set(before) and tree.slots == [n for n in before if n in tree.slots]
            assert len(comp.keep) == len(commit) + len(tree.slots)
        full = reference(tree.context_len, tree.slots, tree.slots, forest)
        assert torch.equal(tree.mask.visible(tree.context_len, len(tree.slots)), full)
