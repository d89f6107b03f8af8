"""Mode policies: what ar, chunk, pipedec and flowspec decide at the scheduler's decision points.

A policy reads its scheduler through a `SchedulerView` (queries only) and returns decisions: how many of the
best unsent nodes go out next, and which draft job to run (`GrowTree`, `GrowLayer` or None). The scheduler
carries them out, so every change of state happens in one place.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flowspec.sched.budget import Budget, Mode
from flowspec.sched.growth import DraftDecision, GrowLayer, GrowTree

if TYPE_CHECKING:
    from flowspec.sched.scheduler import Scheduler

__all__ = ["POLICIES", "SchedulerView", "largest_segment"]


def largest_segment(budget: Budget) -> int:
    """The most rows one segment of `budget.mode` carries: what a stage forward must be sized (and a testbed
    calibrated) for. The policies below send no more than this, and their fixed sizes are this."""
    match budget.mode:
        case Mode.AR:
            return 1
        case Mode.CHUNK:  # a whole first tree, the root and its `init_tokens` drafts, in chunks
            return _chunk_size(budget.init_tokens + 1, budget.num_stages)
        case Mode.PIPEDEC:
            return max(budget.width, 1)
        case Mode.FLOWSPEC:
            return budget.segment


def _chunk_size(tree_size: int, num_stages: int) -> int:
    """Chunk-PP splits a tree into num_stages + 1 chunks."""
    return -(-tree_size // (num_stages + 1))


class SchedulerView:
    """What a policy may know of its scheduler: queries only, so every change goes through the scheduler."""

    __slots__ = ("_s",)

    def __init__(self, scheduler: Scheduler) -> None:
        self._s = scheduler

    @property
    def budget(self) -> Budget:
        return self._s.budget

    @property
    def drafting(self) -> bool:
        """A draft job is running (there is at most one)."""
        return self._s.drafting

    @property
    def segments_in_flight(self) -> int:
        return len(self._s.in_flight)

    @property
    def tree_size(self) -> int:
        return len(self._s.tree)

    @property
    def unsent_count(self) -> int:
        return self._s.tree.unsent_count()

    @property
    def root_id(self) -> int:
        return self._s.tree.root_id

    @property
    def drafts_merged_in_round(self) -> int:
        """Draft jobs merged since the current round's root was made."""
        return self._s.drafts_merged_in_round

    @property
    def fresh_round(self) -> bool:
        """A round just started: its root is not sent yet."""
        return self._s.tree.fresh_round

    def best_leaf_id(self) -> int:
        return self._s.tree.best_leaf().id

    def reach(self, node_id: int) -> float:
        """The draft's chance that the accepted path reaches `node_id`."""
        return self._s.tree.reach(node_id)


class _Policy:
    """What a mode decides at the decision points of the shared machinery; it reads, the scheduler acts."""

    def __init__(self, view: SchedulerView) -> None:
        self.view = view

    def on_round_start(self) -> DraftDecision:
        """A fresh root: the previous round's tree is gone."""
        return None

    def on_verified(self) -> DraftDecision:
        """A verdict moved the root into the surviving tree."""
        return None

    def on_draft_merged(self, decision_pending: bool) -> DraftDecision:
        """A draft job was merged; `decision_pending`: a draft decision came while it ran (and waited)."""
        return None

    def ready_to_verify(self) -> bool:
        return True

    def segment_size(self) -> int:
        """How many of the best unsent nodes go out as the next segment now (0: none)."""
        return largest_segment(self.view.budget)

    def when_idle(self) -> DraftDecision:
        """Nothing more goes out now, a slot is free and no draft job runs."""
        return None

    def draft_ahead(self) -> DraftDecision:
        """The drafter is free (whether or not a slot is): grow the tree ahead of the pipeline."""
        return None

    def min_reach(self) -> float:
        """A segment's rows after its first go out only for nodes at least this likely to be reached (0: all).
        The baselines send what their algorithms say."""
        return 0.0

    def lookup_length(self) -> int:
        """Tokens of prompt lookup to hang under the root after each verdict (0: none)."""
        return 0


class _AutoRegressive(_Policy):
    """One token per trip round the ring (its segments are one row: `largest_segment`)."""


class _ChunkPP(_Policy):
    """A whole tree per round, split into num_stages + 1 chunks; verified once every chunk is back."""

    def on_round_start(self) -> DraftDecision:
        b = self.view.budget
        return GrowTree(self.view.root_id, b.init_tokens, b.depth)

    def ready_to_verify(self) -> bool:
        return self.view.segments_in_flight == 0

    def segment_size(self) -> int:
        if not self.view.drafts_merged_in_round:  # the round's tree is not drafted yet
            return 0
        return _chunk_size(self.view.tree_size, self.view.budget.num_stages)


class _PipeDec(_Policy):
    """One layer per pipeline step: the root alone, then the `width` best children of the deepest layer."""

    def when_idle(self) -> DraftDecision:
        return None if self.view.unsent_count else GrowLayer()


class _FlowSpec(_Policy):
    """Continuous: the best-scored unsent nodes go out every time a slot frees; expand after every verdict."""

    def on_round_start(self) -> DraftDecision:
        b = self.view.budget
        return self._draft(self.view.root_id, b.init_tokens, b.depth)

    def on_verified(self) -> DraftDecision:
        v, b = self.view, self.view.budget
        if v.unsent_count >= b.segment * b.slots:
            return None  # the surviving subtree still fills every slot: drafting now would only delay the head
        anchor = v.best_leaf_id() if b.expand_from_leaf else v.root_id
        return self._draft(anchor, b.expand_tokens, b.expand_depth)

    def on_draft_merged(self, decision_pending: bool) -> DraftDecision:
        return self.on_verified() if decision_pending else None  # expand under the newest root

    def segment_size(self) -> int:
        v = self.view
        if v.fresh_round and v.drafting and not v.budget.eager_root and v.unsent_count <= 1:
            return 0  # a round starts: the root goes out with the first segment of its tree (paper §D.1)
        return super().segment_size()

    def min_reach(self) -> float:
        return self.view.budget.min_reach

    def lookup_length(self) -> int:
        return self.view.budget.lookup

    def draft_ahead(self) -> DraftDecision:
        """Keep drafting below the likeliest leaf while the pipeline works, up to the tree's bound and one
        pipeline's worth of unsent nodes: after a verdict the surviving subtree then already holds the next
        segments, so the pipeline is refilled at once instead of after an expansion."""
        v, b = self.view, self.view.budget
        if not b.draft_ahead or v.tree_size >= b.max_tree or v.unsent_count >= b.segment * b.slots:
            return None
        leaf = v.best_leaf_id()
        if v.reach(leaf) < b.min_reach:
            return None  # its children would never be worth a row
        return self._draft(leaf, b.expand_tokens, b.expand_depth)

    def when_idle(self) -> DraftDecision:
        """Nothing left to send and the drafter is free: deepen below the best-scored leaf."""
        v, b = self.view, self.view.budget
        if v.unsent_count or v.tree_size >= b.max_tree:
            return None
        return self._draft(v.best_leaf_id(), b.expand_tokens, b.expand_depth)

    def _draft(self, anchor_id: int, tokens: int, depth: int) -> DraftDecision:
        return GrowTree(anchor_id, tokens, depth)


POLICIES: dict[Mode, type[_Policy]] = {
    Mode.AR: _AutoRegressive,
    Mode.CHUNK: _ChunkPP,
    Mode.PIPEDEC: _PipeDec,
    Mode.FLOWSPEC: _FlowSpec,
}
