"""Attention visibility masks (bool, True = may attend)."""

from __future__ import annotations

import torch


def causal_visible(cache_len: int, n: int) -> torch.Tensor:
    """bool [n, cache_len + n]: row i sees the whole cache plus new rows 0..i (plain causal append)."""
    new = torch.ones(n, n, dtype=torch.bool).tril_()  # [n, n]
    return torch.cat([torch.ones(n, cache_len, dtype=torch.bool), new], dim=1)


def tree_visible(cache_len: int, parents: list[int], base: list[list[int]] | None = None) -> torch.Tensor:
    """bool [n, cache_len + n] for n new tree rows appended after `cache_len` fully visible slots.

    `parents[i]` is -1 (child of the context) or an index of an earlier new row (< i). Row i sees the context,
    its ancestors and itself. Used by tests and drafters; stages build theirs from node ids the same way.
    """
    n = len(parents)
    vis = torch.zeros(n, cache_len + n, dtype=torch.bool)
    vis[:, :cache_len] = True
    for i, p in enumerate(parents):
        if p >= i:
            raise ValueError(f"parent {p} of row {i} must be -1 or an earlier row")
        if p >= 0:
            vis[i, cache_len : cache_len + n] = vis[p, cache_len : cache_len + n]
        vis[i, cache_len + i] = True
    return vis
