"""The head's draft tree: nodes by id, a priority queue of unsent nodes by cumulative score, pruning.

Node ids are request-local, strictly increasing and never reused, so `parent < id` (topological order) holds
by construction, and stages can name nodes without index arithmetic (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import enum
import heapq
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch

from flowspec.errors import LocalProtocolError

__all__ = ["DraftTree", "Node", "NodeState"]

CONTEXT = -1  # parent id of a round's root: its parent is the committed context


class NodeState(enum.Enum):
    UNSENT = "unsent"  # in the priority queue
    IN_FLIGHT = "in_flight"  # sent, target logits not back yet
    RETURNED = "returned"  # the target's logits after this node are known


@dataclass(slots=True)
class Node:
    id: int
    token: int
    parent: int
    position: int  # absolute position in the sequence; never changes
    score: float  # cumulative draft log-prob along the path; only its order among live nodes matters
    state: NodeState = NodeState.UNSENT
    logits: torch.Tensor | None = None  # [V], set when RETURNED
    children: dict[int, int] = field(default_factory=dict)  # token -> child id


class DraftTree:
    """Live draft nodes of one request: the current root and its descendants.

    Everything else is dead the moment the root moves, and is forgotten.
    """

    def __init__(self) -> None:
        self.nodes: dict[int, Node] = {}
        self.root_id = CONTEXT
        self._next_id = 0
        self._queue: list[tuple[float, int]] = []  # (-score, id): best score first, then older id

    # -- creation ---------------------------------------------------------------------------------------
    @property
    def watermark(self) -> int:
        """The largest node id created so far (-1 before the first)."""
        return self._next_id - 1

    def new_root(self, token: int, position: int) -> Node:
        """Start a round: a fresh root whose parent is the committed context; every other node dies."""
        node = self._create(token, CONTEXT, position, 0.0)
        self.nodes = {node.id: node}
        self.root_id = node.id
        return node

    def add_child(self, parent_id: int, token: int, logprob: float) -> Node:
        """The child of `parent_id` carrying `token`: the existing one (merge by token path) or a new one."""
        parent = self.nodes[parent_id]
        existing = parent.children.get(token)
        if existing is not None:
            return self.nodes[existing]
        node = self._create(token, parent_id, parent.position + 1, parent.score + logprob)
        parent.children[token] = node.id
        return node

    def _create(self, token: int, parent: int, position: int, score: float) -> Node:
        node = Node(self._next_id, token, parent, position, score)
        self._next_id += 1
        self.nodes[node.id] = node
        heapq.heappush(self._queue, (-score, node.id))
        return node

    # -- queries ----------------------------------------------------------------------------------------
    @property
    def root(self) -> Node:
        return self.nodes[self.root_id]

    def is_live(self, node_id: int) -> bool:
        return node_id in self.nodes

    def __len__(self) -> int:
        return len(self.nodes)

    def depth(self, node_id: int) -> int:
        """Depth below the current root (root = 0)."""
        return self.nodes[node_id].position - self.root.position

    def path_tokens(self, node_id: int) -> list[int]:
        """Tokens from the root to `node_id`, both included."""
        tokens: list[int] = []
        current = node_id
        while current != CONTEXT and current in self.nodes:
            tokens.append(self.nodes[current].token)
            if current == self.root_id:
                break
            current = self.nodes[current].parent
        tokens.reverse()
        return tokens

    def topological(self) -> Iterator[Node]:
        """Live nodes, parents before children (ascending id)."""
        for node_id in sorted(self.nodes):
            yield self.nodes[node_id]

    def unsent_count(self) -> int:
        return sum(1 for node in self.nodes.values() if node.state is NodeState.UNSENT)

    @property
    def fresh_round(self) -> bool:
        """A round just started: the root is new (its parent is the committed context) and not sent yet."""
        return self.root.parent == CONTEXT and self.root.state is NodeState.UNSENT

    def wire_parent(self, node: Node) -> int:
        """`node`'s parent as the stages see it: the root hangs under the committed context."""
        return CONTEXT if node.id == self.root_id else node.parent

    def reach(self, node_id: int) -> float:
        """The draft's estimate of the chance that the accepted path reaches `node_id` from the root."""
        return math.exp(self.nodes[node_id].score - self.root.score)

    def best_leaf(self) -> Node:
        """The leaf most likely to lie on the accepted path (highest cumulative draft score, then oldest)."""
        leaves = [n for n in self.nodes.values() if not n.children]
        return max(leaves, key=lambda n: (n.score, -n.id))

    # -- the priority queue -----------------------------------------------------------------------------
    def pop_best(self, limit: int, floor: float = -math.inf) -> list[Node]:
        """Up to `limit` unsent live nodes, best cumulative score first; marks them in flight. After the first,
        only nodes scoring at least `floor` are taken (the rest stay queued).

        A child never outscores its parent (log-probs <= 0) and ties go to the older id, so a node's parent is
        always popped before it: every prefix of the pops is ancestor-closed.
        """
        taken: list[Node] = []
        while self._queue and len(taken) < limit:
            negative_score, node_id = self._queue[0]
            node = self.nodes.get(node_id)
            if node is None or node.state is not NodeState.UNSENT:
                heapq.heappop(self._queue)
                continue  # dead or already sent: lazy deletion
            if taken and -negative_score < floor:
                break
            heapq.heappop(self._queue)
            if node.parent != CONTEXT and node.id != self.root_id:
                parent = self.nodes[node.parent]
                if parent.state is NodeState.UNSENT:
                    raise LocalProtocolError(f"node {node.id} popped before its parent {parent.id}")
            node.state = NodeState.IN_FLIGHT
            taken.append(node)
        return taken

    def requeue_unsent(self) -> None:
        """Rebuild the heap from live unsent nodes (drops dead entries; keeps memory bounded)."""
        self._queue = [(-n.score, n.id) for n in self.nodes.values() if n.state is NodeState.UNSENT]
        heapq.heapify(self._queue)

    # -- verification results ---------------------------------------------------------------------------
    def record_logits(self, node_id: int, logits: torch.Tensor) -> bool:
        """Store the target's logits after `node_id`; False when the node is dead (ignore the row)."""
        node = self.nodes.get(node_id)
        if node is None:
            return False
        if node.state is NodeState.UNSENT:
            raise LocalProtocolError(f"logits came back for node {node_id}, which was never sent")
        node.state = NodeState.RETURNED
        node.logits = logits
        return True

    def advance_root(self, token: int) -> tuple[int, bool]:
        """Commit the root and move to its child carrying `token`, or to a fresh root if none exists.

        Returns (old root id, whether the draft continued). Prunes everything outside the new subtree.
        """
        old = self.root
        child_id = old.children.get(token)
        if child_id is None:
            self.new_root(token, old.position + 1)
            return old.id, False
        self.root_id = child_id
        self._prune_to_subtree(child_id)
        return old.id, True

    def _prune_to_subtree(self, root_id: int) -> None:
        keep: dict[int, Node] = {}
        for node_id in sorted(self.nodes):  # ascending id: parents are decided before children
            node = self.nodes[node_id]
            if node_id == root_id or node.parent in keep:
                keep[node_id] = node
        self.nodes = keep
        if len(self._queue) > 4 * max(len(keep), 16):
            self.requeue_unsent()

    def subtree_ids(self, node_id: int) -> Iterable[int]:
        stack = [node_id]
        while stack:
            current = stack.pop()
            yield current
            stack.extend(self.nodes[current].children.values())
