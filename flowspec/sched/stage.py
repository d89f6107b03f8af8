"""A stage's view of the draft tree (sans-IO): which KV slots hold what, which rows are alive, the mask.

The stage's cache is `[committed context | tree slots]`. Verdicts move committed tree slots into the context
(in sequence order) and drop the slots that died; arriving rows are filtered and get their attention row
rebuilt from parent ids: all of the context plus their tree ancestors plus themselves. See
docs/ARCHITECTURE.md for why this is exact without a global barrier.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from flowspec.errors import PeerProtocolError
from flowspec.treemask import TreeMask

__all__ = ["Admission", "Compaction", "StageTree"]


@dataclass(frozen=True, slots=True)
class Compaction:
    """Apply to the KV cache as `cache.compact(start, keep)`."""

    start: int
    keep: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Admission:
    """The rows of an arriving segment that are alive, and their attention mask."""

    rows: tuple[int, ...]  # indices into the segment
    visible: torch.Tensor | None  # [len(rows), cache_len + len(rows)] bool; None when no rows survive


class StageTree:
    def __init__(self, context_len: int = 0) -> None:
        self.context_len = context_len  # slots [0, context_len) hold committed tokens
        self.slots: list[int] = []  # node id held in tree slot context_len + i
        self.parent: dict[int, int] = {}  # held node id -> parent id (-1: the context)
        self.mask = TreeMask()  # ancestor-or-self over tree slots, in slot order
        self.applied = 0  # seq of the last verdict applied
        self.root = -1
        self.watermark = -1

    @property
    def cache_len(self) -> int:
        return self.context_len + len(self.slots)

    def prefilled(self, n: int) -> None:
        """`n` prompt tokens went into the context (before any tree exists)."""
        if self.slots:
            raise PeerProtocolError("prefill after decoding started", code="order")
        self.context_len += n

    # -- verdicts ---------------------------------------------------------------------------------------
    def apply_verdict(self, seq: int, commit: Sequence[int], root: int, watermark: int) -> Compaction:
        if seq != self.applied + 1:
            raise PeerProtocolError(f"verdict {seq} out of order (last applied {self.applied})", code="order")
        index = {node_id: i for i, node_id in enumerate(self.slots)}
        missing = [c for c in commit if c not in index]
        if missing:
            raise PeerProtocolError(f"verdict {seq} commits nodes {missing} this stage never computed",
                                    code="order")
        committed = set(commit)
        alive: dict[int, bool] = {}
        kept: list[int] = []
        for node_id in self.slots:  # slot order is topological: parents were admitted first
            ok = node_id not in committed and (
                node_id == root or node_id > watermark or alive.get(self.parent[node_id], False)
            )
            alive[node_id] = ok
            if ok:
                kept.append(node_id)
        keep_slots = tuple(self.context_len + index[n] for n in (*commit, *kept))
        start = self.context_len
        self.mask.keep([index[n] for n in kept])
        for node_id in commit:
            del self.parent[node_id]
        for node_id in self.slots:
            if node_id not in committed and not alive[node_id]:
                del self.parent[node_id]
        self.context_len += len(commit)
        self.slots = kept
        self.applied, self.root, self.watermark = seq, root, watermark
        return Compaction(start, keep_slots)

    # -- arriving rows -----------------------------------------------------------------------------------
    def admit(self, ids: Sequence[int], parents: Sequence[int]) -> Admission:
        """Filter a segment's rows, register the survivors as new tree slots and build their mask."""
        held = {node_id: i for i, node_id in enumerate(self.slots)}
        rows: list[int] = []
        slot_parents: list[int] = []  # per admitted row: its parent's tree slot, -1 for the round's root
        for row, (node_id, parent) in enumerate(zip(ids, parents)):
            if node_id in held:
                raise PeerProtocolError(f"node {node_id} arrived twice", code="order")
            if node_id != self.root and parent not in held:
                continue  # its branch died (or it was the root of a round that is already over)
            slot_parents.append(-1 if node_id == self.root else held[parent])
            held[node_id] = len(held)
            rows.append(row)
        if not rows:
            return Admission((), None)
        for row in rows:
            self.parent[ids[row]] = -1 if ids[row] == self.root else parents[row]
        self.slots.extend(ids[r] for r in rows)
        self.mask.extend(slot_parents)
        return Admission(tuple(rows), self.mask.visible(self.context_len, len(rows)))
