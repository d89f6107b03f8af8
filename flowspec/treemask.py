"""Attention visibility masks (bool, True = may attend), built in one place for stages, drafters and the model.

A forward appends rows to a KV cache laid out as

    [context: `context_len` slots | pending: `causal_rows` slots | tree: len(mask) slots]

and its mask is bool [causal_rows + new, context_len + causal_rows + len(mask)]:

- every row sees the whole context;
- pending rows (context tokens not yet in the cache) are causal among themselves and see no tree slot;
- the `new` newest tree slots each see all of the pending rows and their tree ancestors plus themselves.

`TreeMask` keeps the ancestor-or-self matrix over tree slots; parents are slot indices (-1: a child of the
context), always earlier than the child, so slot order is topological. Bottom layer: torch only, so both
`flowspec.sched` and `flowspec.model` may use it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from flowspec.errors import LocalProtocolError

__all__ = ["TreeMask", "causal_visible", "tree_visible"]


class TreeMask:
    """Ancestor-or-self relation over tree slots: `anc[i, j]` is True iff slot j is slot i or an ancestor of it."""

    def __init__(self) -> None:
        self._anc = torch.zeros(0, 0, dtype=torch.bool)  # [T, T], lower triangular with a true diagonal

    def __len__(self) -> int:
        return self._anc.shape[0]

    def extend(self, parents: Sequence[int]) -> None:
        """Append len(parents) slots; `parents[i]` is -1 or an index of an earlier slot (< len(self) + i)."""
        t, n = len(self), len(parents)
        if n == 0:
            return
        for i, p in enumerate(parents):
            if not -1 <= p < t + i:
                raise LocalProtocolError(f"parent {p} of tree slot {t + i} must be -1 or an earlier slot")
        grown = torch.zeros(t + n, t + n, dtype=torch.bool)
        grown[:t, :t] = self._anc
        grown[t:, t:].diagonal().fill_(True)
        below_old = [i for i, p in enumerate(parents) if 0 <= p < t]
        if below_old:  # one gather for every new slot whose parent is an old slot
            grown[[t + i for i in below_old], :t] = self._anc[[parents[i] for i in below_old]]
        for i, p in enumerate(parents):
            if p >= t:  # a parent from this call: its row is already complete (parents come before children)
                grown[t + i, : p + 1] = grown[p, : p + 1]
        self._anc = grown

    def keep(self, indices: Sequence[int]) -> None:
        """Keep only these slots (strictly increasing, so order stays topological), renumbered 0..k-1."""
        keep = list(indices)
        if keep and not (0 <= keep[0] and keep[-1] < len(self) and all(a < b for a, b in zip(keep, keep[1:]))):
            raise LocalProtocolError(f"keep: slots must be strictly increasing in [0, {len(self)}), got {keep}")
        idx = torch.tensor(keep, dtype=torch.long)  # [k]
        self._anc = self._anc[idx[:, None], idx]

    def truncate(self, n: int) -> None:
        """Keep the first n slots."""
        if not 0 <= n <= len(self):
            raise LocalProtocolError(f"truncate to {n} slots: the mask has {len(self)}")
        self._anc = self._anc[:n, :n]

    def visible(self, context_len: int, new: int, causal_rows: int = 0) -> torch.Tensor:
        """bool [causal_rows + new, context_len + causal_rows + len(self)]: the mask of one forward (module doc).

        The rows are the `causal_rows` pending context tokens, then the newest `new` tree slots. Pending rows sit
        in the cache before every tree slot, so they require that all tree slots are new.
        """
        t = len(self)
        if not 0 <= new <= t or (causal_rows and new != t) or context_len < 0 or causal_rows < 0:
            raise LocalProtocolError(f"visible(context_len={context_len}, new={new}, causal_rows={causal_rows}) "
                                     f"on {t} tree slots: pending rows go in before the tree slots")
        ctx = context_len + causal_rows
        vis = torch.ones(causal_rows + new, ctx + t, dtype=torch.bool)
        vis[:causal_rows, context_len:].tril_()  # pending rows: causal among themselves, before every tree slot
        vis[causal_rows:, ctx:] = self._anc[t - new :]
        return vis


def causal_visible(cache_len: int, n: int) -> torch.Tensor:
    """bool [n, cache_len + n]: row i sees the whole cache plus new rows 0..i (plain causal append)."""
    return TreeMask().visible(cache_len, 0, causal_rows=n)


def tree_visible(cache_len: int, parents: Sequence[int]) -> torch.Tensor:
    """bool [n, cache_len + n] for n new tree rows after `cache_len` context slots (`parents` as in extend)."""
    mask = TreeMask()
    mask.extend(parents)
    return mask.visible(cache_len, len(parents))
