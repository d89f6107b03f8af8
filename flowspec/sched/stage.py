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
        self.ancestors = torch.zeros(0, 0, dtype=torch.bool)  # [T, T]: row's node sees column's slot
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
        keep_rows = [index[n] for n in kept]
        self.ancestors = self.ancestors[keep_rows][:, keep_rows]
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
        new_rows: list[torch.Tensor] = []
        old_t = len(self.slots)
        for row, (node_id, parent) in enumerate(zip(ids, parents)):
            if node_id in held:
                raise PeerProtocolError(f"node {node_id} arrived twice", code="order")
            if node_id != self.root and parent not in held:
                continue  # its branch died (or it was the root of a round that is already over)
            vis = torch.zeros(old_t + len(rows) + 1, dtype=torch.bool)
            if node_id != self.root:
                p = held[parent]
                vis[: p + 1] = self._row(p, new_rows, old_t)
            vis[-1] = True
            held[node_id] = old_t + len(rows)
            self.parent[node_id] = parent if node_id != self.root else -1
            rows.append(row)
            new_rows.append(vis)
        if not rows:
            return Admission((), None)
        t = old_t + len(rows)
        grown = torch.zeros(t, t, dtype=torch.bool)
        grown[:old_t, :old_t] = self.ancestors
        for i, vis in enumerate(new_rows):
            grown[old_t + i, : vis.numel()] = vis
        self.ancestors = grown
        self.slots.extend(ids[r] for r in rows)
        visible = torch.ones(len(rows), self.context_len + t, dtype=torch.bool)
        visible[:, self.context_len :] = grown[old_t:]
        return Admission(tuple(rows), visible)

    def _row(self, slot: int, new_rows: list[torch.Tensor], old_t: int) -> torch.Tensor:
        if slot < old_t:
            return self.ancestors[slot, : slot + 1]
        return new_rows[slot - old_t]
