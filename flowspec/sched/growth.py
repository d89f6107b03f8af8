"""Draft jobs: how the head grows the tree, as sans-IO drivers of a drafter.

The shell drives a job with any drafter that can forward "scratch" nodes on top of the committed context:

    drafter.sync(job.context); drafter.begin_job()
    while (request := job.next_request()) is not None:
        job.feed(drafter.expand(request.tokens, request.parents, request.positions))

`parents` in a request index the scratch nodes fed since the job started (-1: child of the context).

A mode policy asks for growth with a decision (`GrowTree`, `GrowLayer`); `job_for` turns it into the job for
the current tree, or into nothing when the job could not add a node.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypeAlias, final

import torch

from flowspec.errors import LocalProtocolError
from flowspec.sched.budget import Budget
from flowspec.sched.tree import DraftTree

__all__ = [
    "Candidate", "DraftDecision", "DraftJob", "ExpandRequest", "GrowLayer", "GrowTree", "LayerGrowth", "TreeGrowth",
    "job_for",
]


@dataclass(frozen=True, slots=True)
class ExpandRequest:
    tokens: tuple[int, ...]
    parents: tuple[int, ...]  # scratch index of each node's parent, -1 = the committed context
    positions: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Candidate:
    """A drafted node. Its parent is an earlier candidate (`parent_cand >= 0`) or the tree node `parent_id`."""

    token: int
    logprob: float  # draft log-prob of `token` given its parent
    parent_cand: int = -1
    parent_id: int = -1


@dataclass
class DraftJob:
    """Base: a job grows candidates under the live tree node `anchor_id`."""

    anchor_id: int
    context: tuple[int, ...]  # committed tokens before the round's root, for drafter.sync
    candidates: list[Candidate] = field(default_factory=list)
    abandoned: bool = False

    def next_request(self) -> ExpandRequest | None:
        raise NotImplementedError

    def feed(self, logprobs: torch.Tensor) -> None:
        raise NotImplementedError

    def abandon(self) -> None:
        """Stop early (the anchor died): no candidates, no more requests."""
        self.candidates = []
        self.abandoned = True


def _top_children(logprobs: torch.Tensor, k: int) -> list[tuple[float, int]]:
    values, tokens = torch.topk(logprobs.float(), k)
    return [(float(v), int(t)) for v, t in zip(values, tokens)]


@dataclass
class TreeGrowth(DraftJob):
    """EAGLE-2 dynamic tree under one node: top-k per beam node per level, beam of k, global top-K.

    Level 0 forwards the anchor path's last node; each next level forwards the beam (the k best candidates of
    the previous level by cumulative score). The tree is the `budget` best candidates by cumulative score,
    kept ancestor-closed even when scores tie.
    """

    path_tokens: tuple[int, ...] = ()  # tokens from the round root to the anchor (fed as scratch first)
    anchor_position: int = 0
    topk: int = 4
    depth: int = 3
    budget: int = 16
    _level: int = 0
    _beam: list[int] = field(default_factory=list)  # candidate indices awaiting expansion
    _scratch_of: dict[int, int] = field(default_factory=dict)  # candidate index -> scratch index
    _cumulative: list[float] = field(default_factory=list)
    _fed: int = 0

    def next_request(self) -> ExpandRequest | None:
        if self.abandoned:
            return None
        if self._level == 0:
            n = len(self.path_tokens)
            start = self.anchor_position - n + 1
            return ExpandRequest(
                tuple(self.path_tokens), tuple(range(-1, n - 1)), tuple(range(start, start + n))
            )
        if self._level > self.depth or not self._beam:
            return None
        tokens, parents, positions = [], [], []
        for cand_index in self._beam:
            cand = self.candidates[cand_index]
            tokens.append(cand.token)
            parents.append(self._scratch_parent(cand))
            positions.append(self.anchor_position + self._depth_of(cand_index))
        return ExpandRequest(tuple(tokens), tuple(parents), tuple(positions))

    def feed(self, logprobs: torch.Tensor) -> None:
        if self._level == 0:
            n = len(self.path_tokens)
            self._fed = n
            for score, token in _top_children(logprobs[n - 1], self.topk):
                self._add(Candidate(token, score, parent_id=self.anchor_id), score)
            self._beam = list(range(len(self.candidates)))
        else:
            expanded, self._beam = self._beam, []
            pool: list[int] = []
            for row, cand_index in enumerate(expanded):
                self._scratch_of[cand_index] = self._fed + row
                for score, token in _top_children(logprobs[row], self.topk):
                    pool.append(self._add(Candidate(token, score, parent_cand=cand_index),
                                          self._cumulative[cand_index] + score))
            self._fed += len(expanded)
            pool.sort(key=lambda i: (-self._cumulative[i], i))
            self._beam = pool[: self.topk]
        self._level += 1
        if self.next_request() is None:
            self._select()

    def _add(self, cand: Candidate, cumulative: float) -> int:
        self.candidates.append(cand)
        self._cumulative.append(cumulative)
        return len(self.candidates) - 1

    def _scratch_parent(self, cand: Candidate) -> int:
        if cand.parent_cand < 0:
            return len(self.path_tokens) - 1  # the anchor is the last scratch node of level 0
        return self._scratch_of[cand.parent_cand]

    def _depth_of(self, cand_index: int) -> int:
        depth = 1
        while (parent := self.candidates[cand_index].parent_cand) >= 0:
            depth, cand_index = depth + 1, parent
        return depth

    def _select(self) -> None:
        """Keep the `budget` best candidates, ancestor-closed, renumbered in selection order."""
        order = sorted(range(len(self.candidates)), key=lambda i: (-self._cumulative[i], i))
        chosen: dict[int, int] = {}
        for index in order:
            if len(chosen) >= self.budget:
                break
            parent = self.candidates[index].parent_cand
            if parent >= 0 and parent not in chosen:
                continue  # its parent lost a tie: skip rather than attach it to a wrong parent
            chosen[index] = len(chosen)
        selected = []
        for index in chosen:
            cand = self.candidates[index]
            parent = chosen[cand.parent_cand] if cand.parent_cand >= 0 else -1
            selected.append(Candidate(cand.token, cand.logprob, parent, cand.parent_id))
        self.candidates = selected
        self._beam = []
        self._level = self.depth + 1


@dataclass
class LayerGrowth(DraftJob):
    """PipeDec: one new layer of `width` nodes below the deepest layer, re-drafting the whole live tree.

    `tree` lists the live nodes (id, token, parent id or -1, position) in topological order, round root first;
    `frontier` are the ids of the deepest layer and `scores` their cumulative draft scores.
    """

    tree: tuple[tuple[int, int, int, int], ...] = ()
    frontier: tuple[int, ...] = ()
    scores: tuple[float, ...] = ()
    width: int = 4
    _done: bool = False

    def next_request(self) -> ExpandRequest | None:
        if self._done or self.abandoned:
            return None
        index_of = {node_id: i for i, (node_id, _, _, _) in enumerate(self.tree)}
        parents = tuple(index_of.get(parent, -1) for _, _, parent, _ in self.tree)
        return ExpandRequest(
            tuple(token for _, token, _, _ in self.tree), parents, tuple(pos for *_, pos in self.tree)
        )

    def feed(self, logprobs: torch.Tensor) -> None:
        if self._done:
            raise LocalProtocolError("LayerGrowth fed twice")
        index_of = {node_id: i for i, (node_id, _, _, _) in enumerate(self.tree)}
        pool: list[tuple[float, int, int, float]] = []  # (-cumulative, parent id, token, logprob)
        for node_id, score in zip(self.frontier, self.scores):
            for logprob, token in _top_children(logprobs[index_of[node_id]], self.width):
                pool.append((-(score + logprob), node_id, token, logprob))
        pool.sort()
        self.candidates = [Candidate(token, lp, parent_id=parent) for _, parent, token, lp in pool[: self.width]]
        self._done = True


@final
@dataclass(frozen=True, slots=True)
class GrowTree:
    """Draft up to `tokens` nodes, `depth` beam levels deep, below the live node `anchor_id`."""

    anchor_id: int
    tokens: int
    depth: int


@final
@dataclass(frozen=True, slots=True)
class GrowLayer:
    """PipeDec: draft one new layer below the deepest layer of the live tree."""


DraftDecision: TypeAlias = GrowTree | GrowLayer | None  # None: draft nothing now


def job_for(decision: GrowTree | GrowLayer, tree: DraftTree, context: tuple[int, ...], budget: Budget,
            max_context: int) -> DraftJob | None:
    """The job that carries out `decision` on `tree`; None when it could add no node (tree or KV full)."""
    match decision:
        case GrowTree():
            return _tree_growth(decision, tree, context, budget, max_context)
        case GrowLayer():
            return _layer_growth(tree, context, budget.width, max_context)


def _tree_growth(decision: GrowTree, tree: DraftTree, context: tuple[int, ...], budget: Budget,
                 max_context: int) -> TreeGrowth | None:
    anchor = tree.nodes[decision.anchor_id]
    room = max_context - 1 - anchor.position  # never draft past the KV capacity
    nodes = min(decision.tokens, budget.max_tree - len(tree))
    if nodes < 1 or room < 1:
        return None
    return TreeGrowth(
        anchor_id=anchor.id,
        context=context,
        path_tokens=tuple(tree.path_tokens(anchor.id)),
        anchor_position=anchor.position,
        topk=budget.topk,
        depth=max(0, min(decision.depth, room - 1)),
        budget=nodes,
    )


def _layer_growth(tree: DraftTree, context: tuple[int, ...], width: int, max_context: int) -> LayerGrowth | None:
    nodes = list(tree.topological())
    deepest = max(node.position for node in nodes)
    if deepest + 1 >= max_context:
        return None
    frontier = [n for n in nodes if n.position == deepest]
    return LayerGrowth(
        anchor_id=tree.root_id,
        context=context,
        tree=tuple((n.id, n.token, tree.wire_parent(n), n.position) for n in nodes),
        frontier=tuple(n.id for n in frontier),
        scores=tuple(n.score for n in frontier),
        width=width,
    )
