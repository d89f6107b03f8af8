"""The head's sans-IO scheduler: `Scheduler.handle(event) -> list[Action]`.

One object per request. It owns the committed tokens, the draft tree with its priority queue, the in-flight
ledger and the verdict sequence; a mode policy decides when to draft and what to send. No I/O, no asyncio,
no model code: the shell (flowspec.node.head) feeds it events and carries out its actions.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field

from flowspec.errors import LocalProtocolError
from flowspec.sched.actions import Action, BroadcastVerdict, EmitTokens, Finish, RunDraft, SendSegment
from flowspec.sched.budget import Budget, Mode
from flowspec.sched.events import Cancelled, DraftReady, Event, Prefilled, SegmentReturned, StageLost
from flowspec.sched.growth import Candidate, DraftJob, LayerGrowth, TreeGrowth
from flowspec.sched.sampling import SamplingParams, choose_token
from flowspec.sched.tree import CONTEXT, DraftTree, Node, NodeState

__all__ = ["DecodeStats", "RequestState", "Scheduler"]


class RequestState(enum.Enum):
    PREFILLING = "prefilling"
    DECODING = "decoding"
    DONE = "done"
    ERROR = "error"  # sticky: every later event is refused with the original reason


# Legal (state, event type) pairs. Anything else is a LocalProtocolError naming both.
_ACCEPTS: dict[RequestState, tuple[type, ...]] = {
    RequestState.PREFILLING: (Prefilled, StageLost, Cancelled),
    RequestState.DECODING: (SegmentReturned, DraftReady, StageLost, Cancelled),
    RequestState.DONE: (SegmentReturned, DraftReady, StageLost, Cancelled),  # late arrivals are ignored
    RequestState.ERROR: (),
}


@dataclass
class DecodeStats:
    steps: int = 0  # segments sent into the pipeline
    rows_sent: int = 0  # tree nodes sent (draft tokens on the wire, roots included)
    verifications: int = 0  # returned segments that committed at least one token
    committed: int = 0  # tokens generated after the first one
    drafts: int = 0  # draft jobs run
    accepted_per_verification: list[int] = field(default_factory=list)

    @property
    def mean_accepted(self) -> float:
        runs = self.accepted_per_verification
        return sum(runs) / len(runs) if runs else 0.0


class Scheduler:
    """Decides, for one request, what goes into the pipeline and what comes out of it."""

    def __init__(
        self,
        prompt: Sequence[int],
        budget: Budget,
        sampling: SamplingParams,
        max_new_tokens: int,
        eos_ids: Sequence[int] = (),
        max_context: int | None = None,
    ) -> None:
        if not prompt:
            raise LocalProtocolError("empty prompt")
        if max_new_tokens < 1:
            raise LocalProtocolError("max_new_tokens must be >= 1")
        self.budget = budget
        self.sampling = sampling
        self.max_new_tokens = max_new_tokens
        self.eos_ids = frozenset(eos_ids)
        self.max_context = max_context or len(prompt) + max_new_tokens + 1
        self.committed: list[int] = list(prompt)
        self.prompt_len = len(prompt)
        self.tree = DraftTree()
        self.state = RequestState.PREFILLING
        self.error: str | None = None
        self.finish_reason: str | None = None
        self.stats = DecodeStats()
        self.seq = 0  # verdicts issued
        self.committed_positions: dict[int, int] = {}  # node id -> position, for drafts that outlive their root
        self.in_flight: dict[int, tuple[int, ...]] = {}  # step -> node ids sent
        self.drafting = False
        self.policy = _POLICIES[budget.mode](self)

    @classmethod
    def resume(cls, prompt_len: int, committed: Sequence[int], budget: Budget, sampling: SamplingParams,
               max_new_tokens: int, eos_ids: Sequence[int] = (),
               max_context: int | None = None) -> tuple[Scheduler, list[Action]]:
        """Continue a request on a fresh pipeline whose stages hold `committed[:-1]` as context.

        Used after a stage was lost and replaced: the shell re-prefills the committed tokens (all but the last,
        which becomes the root of a fresh round) and carries on. Common random numbers make even a sampled
        request continue exactly as it would have.
        """
        if len(committed) <= prompt_len:
            raise LocalProtocolError("nothing was generated yet: start the request again instead")
        s = cls(committed, budget, sampling, max_new_tokens, eos_ids, max_context)
        s.prompt_len = prompt_len
        s.state = RequestState.DECODING
        root = s.tree.new_root(committed[-1], len(committed) - 1)
        s.seq = 1
        actions: list[Action] = [BroadcastVerdict(1, (), root.id, s.tree.watermark)]
        return s, actions + s.policy.on_round_start() + s._fill()

    # -- the one entry point -----------------------------------------------------------------------------
    def handle(self, event: Event) -> list[Action]:
        if self.state is RequestState.ERROR:
            raise LocalProtocolError(f"request is in ERROR ({self.error}); got {type(event).__name__}")
        if not isinstance(event, _ACCEPTS[self.state]):
            raise LocalProtocolError(f"{type(event).__name__} is not legal in state {self.state.name}")
        match event:
            case Prefilled(logits=logits):
                return self._on_prefilled(logits)
            case SegmentReturned():
                return self._on_segment(event)
            case DraftReady(job=job):
                return self._on_draft(job)
            case StageLost(stage=stage, reason=reason):
                return self._fail(f"stage {stage} lost: {reason}")
            case Cancelled(reason=reason):
                return self._finish("cancelled", [])
        raise LocalProtocolError(f"unknown event {event!r}")  # pragma: no cover

    @property
    def generated(self) -> list[int]:
        return self.committed[self.prompt_len :]

    @property
    def done(self) -> bool:
        return self.state in (RequestState.DONE, RequestState.ERROR)

    def is_live(self, node_id: int) -> bool:
        """Whether the shell should bother computing logits for a returned row."""
        return not self.done and self.tree.is_live(node_id)

    # -- handlers --------------------------------------------------------------------------------------
    def _on_prefilled(self, logits: object) -> list[Action]:
        token = choose_token(logits, self.sampling, len(self.committed))  # type: ignore[arg-type]
        self.committed.append(token)
        self.state = RequestState.DECODING
        actions: list[Action] = [EmitTokens((token,))]
        if reason := self._stop_reason(token):
            return self._finish(reason, actions)
        root = self.tree.new_root(token, len(self.committed) - 1)
        self.seq += 1  # the first verdict only names the first root, so stages know it is alive
        actions.append(BroadcastVerdict(self.seq, (), root.id, self.tree.watermark))
        actions += self.policy.on_round_start()
        actions += self._fill()
        return actions

    def _on_segment(self, event: SegmentReturned) -> list[Action]:
        if self.in_flight.pop(event.step, None) is None:
            raise LocalProtocolError(f"segment {event.step} returned but was not in flight")
        if self.done:
            return []
        for row, node_id in enumerate(event.ids):
            self.tree.record_logits(node_id, event.logits[row])
        if not self.policy.ready_to_verify():
            return self._fill()
        actions = self._walk()
        if self.done:
            return actions
        return actions + self._fill()

    def _on_draft(self, job: DraftJob) -> list[Action]:
        self.drafting = False
        if self.done:
            return []
        self.stats.drafts += 1
        self._merge(job)
        return self.policy.on_draft_merged() + self._fill()

    # -- verification: walk the tree while the target's next token is known --------------------------
    def _walk(self) -> list[Action]:
        commit: list[int] = []
        emitted: list[int] = []
        reason = ""
        while (root := self.tree.root).logits is not None:
            token = choose_token(root.logits, self.sampling, root.position + 1)
            old_root, _ = self.tree.advance_root(token)
            commit.append(old_root)
            self.committed_positions[old_root] = root.position
            emitted.append(token)
            self.committed.append(token)
            reason = self._stop_reason(token)
            if reason:
                break
        if not commit:
            return []
        self.stats.verifications += 1
        self.stats.committed += len(emitted)
        self.stats.accepted_per_verification.append(len(emitted))
        actions: list[Action] = [EmitTokens(tuple(emitted))]
        if reason:
            return self._finish(reason, actions)
        self.seq += 1
        actions.append(BroadcastVerdict(self.seq, tuple(commit), self.tree.root_id, self.tree.watermark))
        fresh = self.tree.root.parent == CONTEXT and self.tree.root.state is NodeState.UNSENT
        actions += self.policy.on_round_start() if fresh else self.policy.on_verified()
        return actions

    def _stop_reason(self, token: int) -> str:
        if token in self.eos_ids:
            return "eos"
        if len(self.generated) >= self.max_new_tokens or len(self.committed) >= self.max_context:
            return "length"
        return ""

    # -- sending --------------------------------------------------------------------------------------
    def _fill(self) -> list[Action]:
        actions: list[Action] = []
        while len(self.in_flight) < self.budget.slots:
            nodes = self.policy.next_segment()
            if not nodes:
                break
            actions.append(self._send(nodes))
        if not self.drafting and len(self.in_flight) < self.budget.slots:
            actions += self.policy.when_idle()
        return actions

    def _send(self, nodes: list[Node]) -> SendSegment:
        self.stats.steps += 1
        self.stats.rows_sent += len(nodes)
        step = self.stats.steps
        self.in_flight[step] = tuple(n.id for n in nodes)
        return SendSegment(
            step=step,
            after=self.seq,
            ids=tuple(n.id for n in nodes),
            parents=tuple(n.parent if n.id != self.tree.root_id else CONTEXT for n in nodes),
            positions=tuple(n.position for n in nodes),
            tokens=tuple(n.token for n in nodes),
        )

    # -- drafting -------------------------------------------------------------------------------------
    def run_draft(self, job: DraftJob) -> list[Action]:
        if self.drafting:
            return []
        self.drafting = True
        return [RunDraft(job)]

    def tree_growth(self, anchor: Node, tokens: int, depth: int) -> TreeGrowth:
        path = self.tree.path_tokens(anchor.id)
        room = self.max_context - 1 - anchor.position  # never draft past the KV capacity
        return TreeGrowth(
            anchor_id=anchor.id,
            context=tuple(self.committed[:-1]),
            path_tokens=tuple(path),
            anchor_position=anchor.position,
            topk=self.budget.topk,
            depth=max(0, min(depth, room - 1)),
            budget=min(tokens, self.budget.max_tree - len(self.tree)),
        )

    def _merge(self, job: DraftJob) -> None:
        """Add a finished job's candidates to the tree, merging by token path.

        The root may have moved on while the job ran. A candidate whose parent got committed is still a valid
        draft when its token is the one that was committed next: it then stands for that committed position,
        or for the current root, and its own children become the root's children.
        """
        places: list[int | None] = []  # per candidate: a live node id, a committed position (encoded < -1)
        for cand in job.candidates:
            parent = places[cand.parent_cand] if cand.parent_cand >= 0 else self._place_of(cand.parent_id)
            places.append(self._child_place(parent, cand))

    def draft_useful(self, job: DraftJob) -> bool:
        """Whether a running draft job can still add anything: its anchor is live, or was committed."""
        return not self.done and self._place_of(job.anchor_id) is not None

    def _place_of(self, node_id: int) -> int | None:
        if self.tree.is_live(node_id):
            return node_id
        position = self.committed_positions.get(node_id)
        return None if position is None else -2 - position

    def _child_place(self, parent: int | None, cand: Candidate) -> int | None:
        if parent is None:
            return None  # this branch died while the job ran
        if parent < -1:  # the parent is committed at `position`: follow the committed sequence
            position = -2 - parent + 1
            if position >= len(self.committed) or self.committed[position] != cand.token:
                return None
            return self.tree.root_id if position == self.tree.root.position else -2 - position
        if self.tree.nodes[parent].position + 1 >= self.max_context or len(self.tree) >= self.budget.max_tree:
            return None
        return self.tree.add_child(parent, cand.token, cand.logprob).id

    # -- endings --------------------------------------------------------------------------------------
    def _finish(self, reason: str, actions: list[Action]) -> list[Action]:
        self.state = RequestState.DONE
        self.finish_reason = reason
        return actions + [Finish(reason)]

    def _fail(self, reason: str) -> list[Action]:
        self.state = RequestState.ERROR
        self.error = reason
        self.finish_reason = f"error: {reason}"
        return [Finish(self.finish_reason)]


class _Policy:
    """What a mode does at the decision points of the shared machinery."""

    def __init__(self, s: Scheduler) -> None:
        self.s = s

    def on_round_start(self) -> list[Action]:
        return []

    def on_verified(self) -> list[Action]:
        return []

    def on_draft_merged(self) -> list[Action]:
        return []

    def ready_to_verify(self) -> bool:
        return True

    def next_segment(self) -> list[Node]:
        return self.s.tree.pop_best(self.s.budget.segment)

    def when_idle(self) -> list[Action]:
        return []


class _AutoRegressive(_Policy):
    def next_segment(self) -> list[Node]:
        return self.s.tree.pop_best(1)


class _ChunkPP(_Policy):
    """A whole tree per round, split into num_stages + 1 chunks; verified once every chunk is back."""

    def __init__(self, s: Scheduler) -> None:
        super().__init__(s)
        self.tree_ready = False

    def on_round_start(self) -> list[Action]:
        self.tree_ready = False
        b = self.s.budget
        return self.s.run_draft(self.s.tree_growth(self.s.tree.root, b.init_tokens, b.depth))

    def on_draft_merged(self) -> list[Action]:
        self.tree_ready = True
        return []

    def ready_to_verify(self) -> bool:
        return not self.s.in_flight

    def next_segment(self) -> list[Node]:
        if not self.tree_ready:
            return []
        per_chunk = -(-len(self.s.tree) // (self.s.budget.num_stages + 1))
        return self.s.tree.pop_best(per_chunk)


class _PipeDec(_Policy):
    """One layer per pipeline step: the root alone, then the `width` best children of the deepest layer."""

    def next_segment(self) -> list[Node]:
        return self.s.tree.pop_best(max(self.s.budget.width, 1))

    def when_idle(self) -> list[Action]:
        tree = self.s.tree
        if tree.unsent_count():
            return []
        deepest = max(node.position for node in tree.nodes.values())
        if deepest + 1 >= self.s.max_context:
            return []
        frontier = [n for n in tree.topological() if n.position == deepest]
        job = LayerGrowth(
            anchor_id=tree.root_id,
            context=tuple(self.s.committed[:-1]),
            tree=tuple((n.id, n.token, n.parent if n.id != tree.root_id else CONTEXT, n.position)
                       for n in tree.topological()),
            frontier=tuple(n.id for n in frontier),
            scores=tuple(n.score for n in frontier),
            width=self.s.budget.width,
        )
        return self.s.run_draft(job)


class _FlowSpec(_Policy):
    """Continuous: the best-scored unsent nodes go out every time a slot frees; expand after every verdict."""

    def __init__(self, s: Scheduler) -> None:
        super().__init__(s)
        self.expand_pending = False

    def on_round_start(self) -> list[Action]:
        b = self.s.budget
        return self._draft(self.s.tree.root, b.init_tokens, b.depth)

    def on_verified(self) -> list[Action]:
        b = self.s.budget
        if self.s.tree.unsent_count() >= b.segment * b.slots:
            return []  # the surviving subtree still fills every slot: drafting now would only delay the head
        anchor = self._best_leaf() if b.expand_from_leaf else self.s.tree.root
        return self._draft(anchor, b.expand_tokens, b.expand_depth)

    def on_draft_merged(self) -> list[Action]:
        if self.expand_pending:
            self.expand_pending = False
            return self.on_verified()
        return []

    def next_segment(self) -> list[Node]:
        root = self.s.tree.root
        fresh = root.parent == CONTEXT and root.state is NodeState.UNSENT
        if fresh and self.s.drafting and not self.s.budget.eager_root:
            return []  # a round starts: the root goes out with the first segment of its tree (paper §D.1)
        return super().next_segment()

    def when_idle(self) -> list[Action]:
        """Nothing left to send and the drafter is free: deepen below the best-scored leaf."""
        tree = self.s.tree
        if tree.unsent_count() or len(tree) >= self.s.budget.max_tree:
            return []
        b = self.s.budget
        return self._draft(self._best_leaf(), b.expand_tokens, b.expand_depth)

    def _best_leaf(self) -> Node:
        """The leaf most likely to lie on the accepted path (highest cumulative draft score)."""
        leaves = [n for n in self.s.tree.nodes.values() if not n.children]
        return max(leaves, key=lambda n: (n.score, -n.id))

    def _draft(self, anchor: Node, tokens: int, depth: int) -> list[Action]:
        if self.s.drafting:
            self.expand_pending = True  # expand under the newest root once the running job is merged
            return []
        growth = self.s.tree_growth(anchor, tokens, depth)
        if growth.budget < 1 or anchor.position + 1 >= self.s.max_context:
            return []
        return self.s.run_draft(growth)


_POLICIES: dict[Mode, type[_Policy]] = {
    Mode.AR: _AutoRegressive,
    Mode.CHUNK: _ChunkPP,
    Mode.PIPEDEC: _PipeDec,
    Mode.FLOWSPEC: _FlowSpec,
}
