"""Drafters: a whole small model that proposes tree nodes for D0.

A `Drafter` is the weights (the model and its lm_head), shared by every request the head serves; each request
drafts in a `DraftState` of its own, so requests in flight together never see each other's context or tree.
A state's cache holds the synced context (committed tokens) followed by scratch nodes (the draft tree being
grown). A scratch node sees the context, its scratch ancestors and itself, so one call can expand a whole tree
level.
"""

from __future__ import annotations

import math
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
    """One request's drafting over a Drafter's weights: the synced context and the scratch tree on top of it.

    Scratch nodes outlive a draft job: they form a trie by (parent, token), so a later job (or a later verdict)
    that asks for a node already forwarded gets its log-probs without a forward. In particular the head's
    tree path from the root to an anchor, which every job feeds first, costs nothing the second time, and a
    verdict's accepted tokens stay as scratch nodes instead of being forwarded again as context (`sync`).
    """

    def __init__(self, drafter: Drafter, capacity: int) -> None:
        self.model, self.head = drafter.model, drafter.head
        self.cache = drafter.model.new_cache(capacity)
        # the synced context: K/V of its first `computed` tokens are the cache's context part; the next ones
        # are scratch nodes up to `_anchor` (accepted drafts kept as they are), then `_chain` (not forwarded yet)
        self.context: list[int] = []
        self.computed = 0
        self._mask = TreeMask()  # over the scratch nodes
        self._child: dict[tuple[int, int], int] = {}  # (parent slot or -1, token) -> scratch slot
        self._depth: list[int] = []  # per scratch slot: its depth below the context part (1 = child of it)
        self._top: list[tuple[torch.Tensor, torch.Tensor]] = []  # per scratch slot: its best next tokens
        self._anchor = -1  # the scratch slot that ends the synced context (-1: the context part ends it)
        self._chain: list[int] = []  # synced context tokens still to forward, as scratch nodes under _anchor
        self._job: list[int] = []  # this job's node numbers -> scratch slots (begin_job)

    @property
    def num_scratch(self) -> int:
        return len(self._mask)

    def sync(self, committed: Sequence[int]) -> None:
        """Make the context equal `committed`. Tokens already forwarded as scratch nodes along a path (a
        verdict's accepted drafts) stay where they are; what is new is forwarded lazily, in the same forward as
        the next `expand` (one pass instead of two: drafting is on the head's critical path)."""
        committed = [int(t) for t in committed]
        done = self.computed
        if (len(self._mask) <= _MAX_SCRATCH and len(committed) >= done
                and committed[:done] == self.context[:done]):
            node, i = -1, done
            while i < len(committed) and (node, committed[i]) in self._child:
                node, i = self._child[(node, committed[i])], i + 1
            if node != -1 or not self._mask:  # kept path, or nothing to keep: the rest goes as a chain
                self.context, self._anchor, self._chain = committed, node, committed[i:]
                return
        common = 0
        for a, b in zip(self.context[:done], committed):
            if a != b:
                break
            common += 1
        self.computed = common
        self.context = committed
        self.reset_scratch()

    @property
    def pending(self) -> int:
        """Context tokens not yet in the cache (forwarded with the next expand)."""
        return len(self._chain)

    def flush(self) -> None:
        """Forward the pending context now (expand does this itself)."""
        if self._chain:
            self.expand([], [], [])

    def reset_scratch(self) -> None:
        """Drop every scratch node: the cache is back to the context part; synced tokens past it are pending."""
        self.cache.truncate(self.computed)
        self._mask.truncate(0)
        self._child.clear()
        self._depth.clear()
        self._top.clear()
        self._anchor, self._chain, self._job = -1, self.context[self.computed:], []

    def begin_job(self) -> None:
        """Start a draft job: `expand`'s parent numbers count this job's nodes from 0 again."""
        self._job = []

    def rows_to_forward(self, tokens: Sequence[int], parents: Sequence[int]) -> int:
        """How many rows `expand(tokens, parents, ...)` would forward now (0: every node is known)."""
        return len(self._plan(tokens, parents)[1])

    def expand(self, tokens: list[int], parents: list[int], positions: list[int]) -> torch.Tensor:
        """Log-probs [n, V] (float32) of each node's next token; forwards only nodes not known yet.

        parents[i]: -1 (child of the context) or a number of a node fed since begin_job() (or reset_scratch),
        including earlier nodes of this call. A known node's row holds its best next tokens only (the rest
        -inf): drafting reads the top few.
        """
        n = len(tokens)
        if not n == len(parents) == len(positions):
            raise ModelError(f"expand: {n} tokens, {len(parents)} parents, {len(positions)} positions")
        slots, new = self._plan(tokens, parents)
        base = len(self._mask)
        chain_as_scratch = self._chain_as_scratch()
        chain = self._chain if chain_as_scratch else []
        rows, parent_slots, pos = list(chain), [], []
        previous, first = self._anchor, self._position(self._anchor)
        for j in range(len(chain)):
            parent_slots.append(previous)
            pos.append(first + j)
            previous = base + j
        for i in new:
            rows.append(tokens[i])
            parent_slots.append(slots[i][1])
            pos.append(positions[i])
        logprobs = self._forward(rows, parent_slots, pos, causal=[] if chain_as_scratch else self._chain)
        if chain_as_scratch:
            self._anchor = base + len(chain) - 1
        self._chain = []
        vocab = self.head.cfg.vocab_size
        out = torch.full((n, vocab), -math.inf)
        fresh = {slot: row for row, slot in enumerate(range(base + len(chain), base + len(rows)))}
        for i, (slot, _) in enumerate(slots):
            if slot in fresh:
                out[i] = logprobs[len(chain) + fresh[slot]]
            else:
                values, indices = self._top[slot]
                out[i, indices] = values
        self._job += [slot for slot, _ in slots]
        return out

    # -- internals ------------------------------------------------------------------------------------------
    def _plan(self, tokens: Sequence[int], parents: Sequence[int]) -> tuple[list[tuple[int, int]], list[int]]:
        """Per node (its scratch slot, its parent's slot) and the indices of the nodes to forward; no changes."""
        slots: list[tuple[int, int]] = []
        new: list[int] = []
        known = dict[tuple[int, int], int]()
        chained = len(self._chain) if self._chain_as_scratch() else 0
        next_slot = len(self._mask) + chained
        end = next_slot - 1 if chained else self._anchor  # the scratch slot the synced context ends at
        for i, (token, parent) in enumerate(zip(tokens, parents)):
            numbered = len(self._job) + i
            if not -1 <= parent < numbered:
                raise ModelError(f"expand: parent {parent} of tree slot {numbered} must be -1 or an earlier slot")
            parent_slot = end if parent == -1 else (self._job[parent] if parent < len(self._job)
                                                   else slots[parent - len(self._job)][0])
            key = (parent_slot, int(token))
            slot = self._child.get(key, known.get(key))
            if slot is None:
                slot = known[key] = next_slot + len(new)
                new.append(i)
            slots.append((slot, parent_slot))
        return slots, new

    def _chain_as_scratch(self) -> bool:
        """Pending tokens go in as scratch nodes under the anchor, unless there is no scratch node yet: then as
        plain context rows, kept for good."""
        return bool(self._chain) and (self._anchor != -1 or len(self._mask) > 0)

    def _position(self, slot: int) -> int:
        """The sequence position of a child of `slot` (-1: of the context part)."""
        return self.computed + (self._depth[slot] if slot >= 0 else 0)

    def _forward(self, rows: list[int], parents: list[int], positions: list[int], causal: list[int]
                 ) -> torch.Tensor:
        """One forward: `causal` context rows (only when there are no scratch nodes), then scratch `rows`;
        registers the new scratch nodes; returns their log-probs."""
        if not rows and not causal:
            return torch.zeros(0, self.head.cfg.vocab_size)
        s0, done, m, n = len(self._mask), self.computed, len(causal), len(rows)
        if causal and s0:
            raise ModelError("drafter: context changed under scratch nodes; call sync() first")
        try:
            self._mask.extend(parents)
        except LocalProtocolError as e:
            raise ModelError(f"expand: {e}") from e
        try:
            visible = self._mask.visible(done, n, causal_rows=m)  # [m + n, cache after this forward]
            self._room(m + n)
            ids = torch.tensor(causal + rows, dtype=torch.long)
            pos = torch.tensor(list(range(done, done + m)) + positions, dtype=torch.long)
            hidden = self.model(ids, pos, self.cache, visible)
            logprobs = torch.log_softmax(self.head(hidden[m:]), dim=-1) if n else torch.zeros(0, 1)
        except BaseException:
            self._mask.truncate(s0)  # nothing reached the cache: drop the new nodes again
            raise
        self.computed = done + m
        for j, (token, parent) in enumerate(zip(rows, parents)):
            self._child[(parent, int(token))] = s0 + j
            self._depth.append(self._depth[parent] + 1 if parent >= 0 else 1)
            values, indices = torch.topk(logprobs[j], min(_TOP, logprobs.shape[-1]))
            self._top.append((values, indices))
        return logprobs

    def _room(self, n: int) -> None:
        # drafters grow their cache instead of failing: their context is D0's, not a stage's fixed budget
        need = self.cache.length + n
        if need > self.cache.capacity:
            self.cache.grow(max(need, 2 * self.cache.capacity))


_MAX_SCRATCH = 512  # scratch nodes kept across jobs and verdicts; past this a sync starts over from the context
_TOP = 8  # best next tokens kept per scratch node (drafting reads top-k with k <= 4)


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
