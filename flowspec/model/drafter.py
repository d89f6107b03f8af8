"""Drafters: a whole small model that proposes tree nodes for D0.

A `Drafter` is the weights (the model and its lm_head), shared by every request the head serves; each request
drafts in a `DraftState` of its own, so requests in flight together never see each other's context or tree.
A state's cache holds the synced context (committed tokens) followed by scratch nodes (the draft tree being
grown). A scratch node sees the context, its scratch ancestors and itself, so one call can expand a whole tree
level.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from flowspec.errors import LocalProtocolError, ModelError
from flowspec.model.config import ModelConfig
from flowspec.model.stage import LMHead, StageModel
from flowspec.treemask import TreeMask

__all__ = ["DraftState", "Drafter", "random_drafter_model"]


class Drafter:
    """A draft model's weights, read-only and shared; `new_state()` gives one request its own cache and tree."""

    def __init__(self, model: StageModel, head: LMHead, capacity: int = 1024, name: str = "") -> None:
        if model.embed is None or model.norm is None:
            raise ModelError("a drafter needs a whole model (embedding and final norm)")
        self.model, self.head, self.name = model, head, name
        self.capacity = capacity  # a state's first cache size; it grows when a request needs more

    def new_state(self, capacity: int | None = None) -> DraftState:
        """A fresh, empty drafting state (its own KV cache of `capacity` slots, default the drafter's)."""
        return DraftState(self, capacity or self.capacity)


class DraftState:
    """One request's drafting over a Drafter's weights: the synced context and the scratch tree on top of it."""

    def __init__(self, drafter: Drafter, capacity: int) -> None:
        self.model, self.head = drafter.model, drafter.head
        self.cache = drafter.model.new_cache(capacity)
        self.context: list[int] = []  # the synced context; K/V of its first `computed` tokens are cached
        self.computed = 0  # cache = [context[:computed] | scratch nodes]
        self._mask = TreeMask()  # over the scratch nodes

    @property
    def num_scratch(self) -> int:
        return len(self._mask)

    def sync(self, committed: Sequence[int]) -> None:
        """Make the context equal `committed`: keep the common prefix; what is new is forwarded lazily, in the
        same forward as the next `expand` (one pass instead of two: drafting is on the head's critical path)."""
        committed = [int(t) for t in committed]
        common = 0
        for a, b in zip(self.context[: self.computed], committed):
            if a != b:
                break
            common += 1
        self.computed = common
        self.context = committed
        self.reset_scratch()

    @property
    def pending(self) -> int:
        """Context tokens not yet in the cache (forwarded with the next expand)."""
        return len(self.context) - self.computed

    def flush(self) -> None:
        """Forward the pending context now (expand does this itself)."""
        if self.pending:
            self.reset_scratch()
            self._forward_rows([], [], [])

    def reset_scratch(self) -> None:
        """Drop every scratch node: the cache is back to the computed part of the context."""
        self.cache.truncate(self.computed)
        self._mask.truncate(0)

    def expand(self, tokens: list[int], parents: list[int], positions: list[int]) -> torch.Tensor:
        """Forward n scratch nodes; return log-probs [n, V] (float32) of each node's next token.

        parents[i]: -1 (child of the context) or an index into all scratch nodes fed since reset_scratch(),
        including earlier nodes of this call.
        """
        n = len(tokens)
        if not n == len(parents) == len(positions):
            raise ModelError(f"expand: {n} tokens, {len(parents)} parents, {len(positions)} positions")
        hidden = self._forward_rows(tokens, parents, positions)
        return torch.log_softmax(self.head(hidden), dim=-1)

    def _forward_rows(self, tokens: list[int], parents: list[int], positions: list[int]) -> torch.Tensor:
        """One forward: the pending context rows (causal), then n scratch rows; returns the scratch hidden."""
        s0, n = self.num_scratch, len(tokens)
        pending = self.context[self.computed:]
        if pending and s0:
            raise ModelError("drafter: context changed under scratch nodes; call sync() first")
        done, m = self.computed, len(pending)
        try:
            self._mask.extend(parents)
        except LocalProtocolError as e:
            raise ModelError(f"expand: {e}") from e
        try:
            visible = self._mask.visible(done, n, causal_rows=m)  # [m + n, cache after this forward]
            self._room(m + n)
            rows = torch.tensor(pending + list(tokens), dtype=torch.long)
            pos = torch.tensor(list(range(done, done + m)) + list(positions), dtype=torch.long)
            hidden = self.model(rows, pos, self.cache, visible)
        except BaseException:
            self._mask.truncate(s0)  # nothing reached the cache: drop the new nodes again
            raise
        self.computed = done + m
        return hidden[m:]

    def _room(self, n: int) -> None:
        # drafters grow their cache instead of failing: their context is D0's, not a stage's fixed budget
        need = self.cache.length + n
        if need > self.cache.capacity:
            self.cache.grow(max(need, 2 * self.cache.capacity))


def random_drafter_model(vocab_size: int, seed: int) -> tuple[StageModel, LMHead]:
    """A tiny random llama over the target's vocabulary: a draft that is almost always wrong (tests)."""
    cfg = ModelConfig(arch="llama", vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_layers=2,
                      num_heads=4, num_kv_heads=2, tie_word_embeddings=True)
    gen = torch.Generator().manual_seed(seed)
    model, head = StageModel(cfg, 0, 2, True, True), LMHead(cfg)
    with torch.no_grad():
        for p in [*model.parameters(), *head.parameters()]:
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model.eval().requires_grad_(False), head.eval().requires_grad_(False)
