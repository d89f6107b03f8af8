"""Preallocated KV cache, written by index at explicit slots (gpt-fast style, plus compact and truncate)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from flowspec.errors import ModelError


class KVCache:
    """k, v: [num_layers, num_kv_heads, capacity, head_dim]; slots [0, length) are live.

    A slot's key already carries its RoPE position, so slots may be reordered freely (compact) without
    changing what attention computes; positions live in the keys, not in the slot index.
    """

    def __init__(
        self, num_layers: int, num_kv_heads: int, head_dim: int, capacity: int, dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if capacity <= 0:
            raise ModelError(f"KV cache capacity must be positive, got {capacity}")
        shape = (num_layers, num_kv_heads, capacity, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.capacity = capacity
        self.length = 0

    @property
    def nbytes(self) -> int:
        """Bytes allocated for keys and values (the whole capacity)."""
        return self.k.nbytes + self.v.nbytes

    def check_room(self, n: int) -> None:
        if self.length + n > self.capacity:
            raise ModelError(
                f"KV cache full: {self.length} slots used + {n} new > capacity {self.capacity}; "
                "open the request with a larger capacity (prompt + max new tokens + tree budget)"
            )

    def truncate(self, n: int) -> None:
        """Forget slots [n, length)."""
        if not 0 <= n <= self.length:
            raise ModelError(f"cannot truncate KV cache of length {self.length} to {n}")
        self.length = n

    def compact(self, start: int, keep: Sequence[int] | torch.Tensor) -> None:
        """Gather slots `keep` (all >= start, in the order given) to [start, start+len(keep)); drop the rest."""
        idx = torch.as_tensor(keep, dtype=torch.long).reshape(-1).to(self.k.device)
        if idx.numel():
            lo, hi = int(idx.min()), int(idx.max())
            if lo < start or hi >= self.length:
                raise ModelError(f"compact: slots must lie in [{start}, {self.length}), got [{lo}, {hi}]")
            if idx.unique().numel() != idx.numel():
                raise ModelError("compact: duplicate slots in keep")
        end = start + idx.numel()
        # index_select copies first, so overlapping source/destination ranges are safe
        self.k[:, :, start:end] = self.k.index_select(2, idx)
        self.v[:, :, start:end] = self.v.index_select(2, idx)
        self.length = end

    def grow(self, capacity: int) -> None:
        """Reallocate to a larger capacity, keeping the live slots (used by drafters, not stages)."""
        if capacity <= self.capacity:
            return
        L, h, _, d = self.k.shape
        for name in ("k", "v"):
            old = getattr(self, name)
            new = torch.zeros((L, h, capacity, d), dtype=old.dtype, device=old.device)
            new[:, :, : self.length] = old[:, :, : self.length]
            setattr(self, name, new)
        self.capacity = capacity
