"""The head's sans-IO scheduler: `Scheduler.handle(event) -> list[Action]`.

One object per request. It owns the committed tokens, the draft tree with its priority queue, the in-flight
ledger and the verdict sequence. A mode policy reads a `SchedulerView` and returns decisions (how many nodes to
send now, what to draft); only the scheduler changes state. No I/O, no asyncio, no model code: the shell
(flowspec.node) feeds it events, every failure it sees included, and carries out its actions.

The request's life is the table `TRANSITIONS`: which events each state accepts and, by how the handler came
out (still going, finished, failed), the state that follows. `handle` is the only place that sets the state;
docs/ARCHITECTURE.md's state diagram is generated from the table (scripts/make_state_diagram.py). As in h11,
ERROR is sticky: an exception inside `handle` (a stage's bad frame, or a bug) leaves the request in ERROR
with the reason, and every later event is refused naming it.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TypeAlias, final

from flowspec.errors import LocalProtocolError, PeerProtocolError
from flowspec.sched.actions import Action, BroadcastVerdict, EmitTokens, Finish, RunDraft, SendSegment
from flowspec.sched.budget import Budget
from flowspec.sched.events import (
    Cancelled,
    DraftError,
    DraftReady,
    Event,
    Prefilled,
    SegmentReturned,
    StageError,
    StageLost,
    StepTimedOut,
)
from flowspec.sched.growth import Candidate, DraftDecision, DraftJob, job_for
from flowspec.sched.lookup import LookupScore, NgramIndex
from flowspec.sched.policies import POLICIES, SchedulerView
from flowspec.sched.sampling import SamplingParams, choose_token
from flowspec.sched.tree import DraftTree, Node

__all__ = ["TRANSITIONS", "CommittedAt", "DecodeStats", "Outcome", "RequestState", "Scheduler"]


class RequestState(enum.Enum):
    PREFILLING = "prefilling"
    DECODING = "decoding"
    DONE = "done"
    ERROR = "error"  # sticky: every later event is refused with the original reason


class Outcome(enum.Enum):
    """How one event's handler came out; with the state and the event's type it picks the next state."""

    GOING = "going"  # the request goes on
    FINISHED = "finished"  # it has its answer (eos, length, cancelled), or had it before this event
    FAILED = "failed"  # it cannot go on: a stage was lost or failed, the drafter failed, a step timed out


_S, _O = RequestState, Outcome
_FAILURES = (StageLost, StageError, DraftError, StepTimedOut)
_LATE = {_O.FINISHED: _S.DONE}  # after the answer, arrivals settle the ledger and change nothing

# (state, event type) -> {outcome: next state}. A pair missing here is not legal in that state; an outcome
# missing from its row is a bug in a handler. ERROR accepts nothing (sticky). `Scheduler.resume` starts in
# DECODING (a fresh pipeline holding what was committed).
TRANSITIONS: dict[tuple[RequestState, type], dict[Outcome, RequestState]] = {
    (_S.PREFILLING, Prefilled): {_O.GOING: _S.DECODING, _O.FINISHED: _S.DONE},
    **{(_S.PREFILLING, failure): {_O.FAILED: _S.ERROR} for failure in _FAILURES},
    (_S.PREFILLING, Cancelled): {_O.FINISHED: _S.DONE},
    (_S.DECODING, SegmentReturned): {_O.GOING: _S.DECODING, _O.FINISHED: _S.DONE},
    (_S.DECODING, DraftReady): {_O.GOING: _S.DECODING},
    **{(_S.DECODING, failure): {_O.FAILED: _S.ERROR} for failure in _FAILURES},
    (_S.DECODING, Cancelled): {_O.FINISHED: _S.DONE},
    **{(_S.DONE, late): _LATE for late in (SegmentReturned, DraftReady, *_FAILURES, Cancelled)},
}


@dataclass
class DecodeStats:
    steps: int = 0  # segments sent into the pipeline
    rows_sent: int = 0  # tree nodes sent (draft tokens on the wire, roots included)
    verifications: int = 0  # returned segments that committed at least one token
    committed: int = 0  # tokens generated after the first one
    drafts: int = 0  # draft jobs run
    lookup_proposed: int = 0  # tree nodes added by prompt lookup (new ones, not merged into drafted nodes)
    lookup_accepted: int = 0  # committed tokens that a looked-up node had proposed
    accepted_per_verification: list[int] = field(default_factory=list)

    @property
    def mean_accepted(self) -> float:
        runs = self.accepted_per_verification
        return sum(runs) / len(runs) if runs else 0.0


@final
@dataclass(frozen=True, slots=True)
class CommittedAt:
    """Where a draft lands whose parent got committed while the job ran: the committed token at `position`."""

    position: int


_Place: TypeAlias = int | CommittedAt | None  # a live node id, a committed position, or gone (branch died)


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
        self.lost_stage: int | None = None  # set when the failure was a lost stage: the shell may resume
        self.finish_reason: str | None = None
        self.stats = DecodeStats()
        self.seq = 0  # verdicts issued
        self.committed_positions: dict[int, int] = {}  # node id -> position, for drafts that outlive their root
        self.in_flight: dict[int, tuple[int, ...]] = {}  # step -> node ids sent
        self.drafting = False
        self.lookup = NgramIndex()  # prompt lookup over the committed tokens (flowspec)
        self.lookup.extend(self.committed)
        self.lookup_score = LookupScore()
        self.looked_up: set[int] = set()  # live node ids a lookup proposed
        self.drafts_merged_in_round = 0  # draft jobs merged since the current round's root was made
        self.expand_pending = False  # a draft decision came while a job ran: ask the policy again after it
        self._policy = POLICIES[budget.mode](SchedulerView(self))

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
        return s, actions + s._start_draft(s._round_start()) + s._fill()

    # -- the one entry point -----------------------------------------------------------------------------
    def handle(self, event: Event) -> list[Action]:
        """Advance on one event; returns what the shell must do, in order.

        Raises LocalProtocolError for an event the current state does not accept (naming both), and
        PeerProtocolError for a returned segment the ledger contradicts (the last stage's fault). Any
        exception leaves the request in ERROR.
        """
        name = type(event).__name__
        if self.state is RequestState.ERROR:
            raise LocalProtocolError(f"{name} is not legal in state ERROR: the request failed ({self.error})")
        try:
            row = TRANSITIONS.get((self.state, type(event)))
            if row is None:
                raise LocalProtocolError(f"{name} is not legal in state {self.state.name}")
            actions = self._dispatch(event)
            outcome = self._outcome()
            if outcome not in row:
                raise LocalProtocolError(f"{name} in state {self.state.name} came out {outcome.name}, which "
                                         "the transition table does not allow")
        except Exception as exc:
            self.error = f"{name} in state {self.state.name}: {exc}"
            if self.finish_reason is None:  # an answer already complete keeps its reason
                self.finish_reason = f"error: {self.error}"
            self.state = RequestState.ERROR
            raise
        self.state = row[outcome]
        return actions

    def _dispatch(self, event: Event) -> list[Action]:
        if self.state is RequestState.DONE:
            return self._settle_late(event)
        match event:
            case Prefilled(logits=logits):
                return self._on_prefilled(logits)
            case SegmentReturned():
                return self._on_segment(event)
            case DraftReady(job=job):
                return self._on_draft(job)
            case DraftError(reason=reason):
                self.drafting = False
                return self._fail(f"the drafter failed: {reason}")
            case StepTimedOut(seconds=seconds):
                return self._fail(f"no progress for {seconds:.0f} s: a stage is stalled or too slow "
                                  f"({self.describe_waiting()})")
            case StageLost(stage=stage, reason=reason):
                return self._fail(f"stage {stage} lost: {reason}", lost_stage=stage)
            case StageError(stage=stage, code=code, reason=reason):
                return self._fail(f"stage {stage} reported {code}: {reason}")
            case Cancelled():
                return self._finish("cancelled", [])
        raise LocalProtocolError(f"unknown event {event!r}")  # pragma: no cover

    def _outcome(self) -> Outcome:
        if self.error is not None:
            return Outcome.FAILED
        return Outcome.FINISHED if self.finish_reason is not None else Outcome.GOING

    @property
    def _ended(self) -> bool:
        """The answer is complete or the request failed (during a handler, before `handle` sets the state)."""
        return self.finish_reason is not None

    # -- queries for the shell ---------------------------------------------------------------------------
    @property
    def generated(self) -> list[int]:
        return self.committed[self.prompt_len :]

    @property
    def done(self) -> bool:
        return self.state in (RequestState.DONE, RequestState.ERROR)

    @property
    def stage_capacity(self) -> int:
        """KV slots each stage allocates for this request: the whole context plus the live tree and rows in
        flight (one spare for the root of a fresh round)."""
        return self.max_context + self.budget.tree_slack + 1

    @property
    def idle(self) -> bool:
        """Whether the request expects no event: not prefilling, no segment in flight, no draft job running.

        Before it finishes this never holds (nothing could move the request on); the shell checks it before it
        waits, to report a scheduler bug instead of a timeout.
        """
        if self.state is RequestState.PREFILLING:
            return False
        return self.done or (not self.in_flight and not self.drafting)

    def describe_waiting(self) -> str:
        """What the request waits for, in words, for timeout and stall messages."""
        if self.state is RequestState.PREFILLING:
            return "waiting for the prefill"
        return f"segments in flight: {sorted(self.in_flight)}; draft job running: {self.drafting}"

    def is_live(self, node_id: int) -> bool:
        """Whether the shell should bother computing logits for a returned row."""
        return not self.done and self.tree.is_live(node_id)

    def live_rows(self, ids: Sequence[int]) -> list[int]:
        """Indices into `ids` (a returned segment's rows) whose target logits are still wanted."""
        return [row for row, node_id in enumerate(ids) if self.is_live(node_id)]

    def draft_useful(self, job: DraftJob) -> bool:
        """Whether a running draft job can still add anything: its anchor is live, or was committed."""
        return not self.done and self._place_of(job.anchor_id) is not None

    # -- handlers --------------------------------------------------------------------------------------
    def _on_prefilled(self, logits: object) -> list[Action]:
        token = choose_token(logits, self.sampling, len(self.committed))  # type: ignore[arg-type]
        self.committed.append(token)
        self.lookup.extend((token,))
        actions: list[Action] = [EmitTokens((token,))]
        if reason := self._stop_reason(token):
            return self._finish(reason, actions)
        root = self.tree.new_root(token, len(self.committed) - 1)
        self.seq += 1  # the first verdict only names the first root, so stages know it is alive
        actions.append(BroadcastVerdict(self.seq, (), root.id, self.tree.watermark))
        self._look_up()
        actions += self._start_draft(self._round_start())
        actions += self._fill()
        return actions

    def _on_segment(self, event: SegmentReturned) -> list[Action]:
        sent = self._settle_segment(event.step)
        strays = set(event.ids).difference(sent)
        if strays:
            raise PeerProtocolError(f"segment {event.step} came back with rows {sorted(strays)[:8]} that it "
                                    "never carried")
        if event.logits.shape[0] != len(event.ids):
            raise PeerProtocolError(f"segment {event.step} came back with {event.logits.shape[0]} rows of "
                                    f"logits for {len(event.ids)} nodes")
        for row, node_id in enumerate(event.ids):
            self.tree.record_logits(node_id, event.logits[row])
        if not self._policy.ready_to_verify():
            return self._fill()
        actions = self._walk()
        return actions if self._ended else actions + self._fill()

    def _on_draft(self, job: DraftJob) -> list[Action]:
        self.drafting = False
        self.stats.drafts += 1
        self.drafts_merged_in_round += 1
        self._merge(job)
        pending, self.expand_pending = self.expand_pending, False
        return self._start_draft(self._policy.on_draft_merged(pending)) + self._fill()

    def _settle_late(self, event: Event) -> list[Action]:
        """After the finish nothing changes the output, but the ledger still checks what comes back."""
        match event:
            case SegmentReturned(step=step):
                self._settle_segment(step)
            case DraftReady():
                self.drafting = False
        return []

    def _settle_segment(self, step: int) -> tuple[int, ...]:
        """The node ids segment `step` carried; it is no longer in flight. A step that is not in flight came
        from the last stage (a duplicate, or one it made up)."""
        sent = self.in_flight.pop(step, None)
        if sent is None:
            raise PeerProtocolError(f"segment {step} came back but was not in flight")
        return sent

    # -- verification: walk the tree while the target's next token is known --------------------------
    def _walk(self) -> list[Action]:
        commit: list[int] = []
        emitted: list[int] = []
        reason = ""
        while (root := self.tree.root).logits is not None:
            token = choose_token(root.logits, self.sampling, root.position + 1)
            self._score_lookups(root, token)
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
        self.lookup.extend(emitted)
        self.stats.verifications += 1
        self.stats.committed += len(emitted)
        self.stats.accepted_per_verification.append(len(emitted))
        actions: list[Action] = [EmitTokens(tuple(emitted))]
        if reason:
            return self._finish(reason, actions)
        self.seq += 1
        actions.append(BroadcastVerdict(self.seq, tuple(commit), self.tree.root_id, self.tree.watermark))
        self.looked_up.intersection_update(self.tree.nodes)
        self._look_up()
        decision = self._round_start() if self.tree.fresh_round else self._policy.on_verified()
        return actions + self._start_draft(decision)

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
            nodes = self.tree.pop_best(self._policy.segment_size(), self._floor())
            if not nodes:
                break
            actions.append(self._send(nodes))
        if not self.drafting and len(self.in_flight) < self.budget.slots:
            actions += self._start_draft(self._policy.when_idle())
        if not self.drafting:
            actions += self._start_draft(self._policy.draft_ahead())
        return actions

    def _floor(self) -> float:
        """The lowest score worth a row after a segment's first (the policy's min_reach), as an absolute score."""
        min_reach = self._policy.min_reach()
        if min_reach <= 0.0:
            return -math.inf
        return self.tree.root.score + math.log(min_reach)

    def _send(self, nodes: list[Node]) -> SendSegment:
        self.stats.steps += 1
        self.stats.rows_sent += len(nodes)
        step = self.stats.steps
        self.in_flight[step] = tuple(n.id for n in nodes)
        return SendSegment(
            step=step,
            after=self.seq,
            ids=tuple(n.id for n in nodes),
            parents=tuple(self.tree.wire_parent(n) for n in nodes),
            positions=tuple(n.position for n in nodes),
            tokens=tuple(n.token for n in nodes),
        )

    # -- drafting -------------------------------------------------------------------------------------
    def _round_start(self) -> DraftDecision:
        self.drafts_merged_in_round = 0
        return self._policy.on_round_start()

    def _start_draft(self, decision: DraftDecision) -> list[Action]:
        """Carry out a policy's draft decision: one job at a time, and none that could add nothing. A decision
        that comes while a job runs is remembered: the policy is asked again once that job is merged."""
        if decision is None:
            return []
        if self.drafting:
            self.expand_pending = True
            return []
        job = job_for(decision, self.tree, tuple(self.committed[:-1]), self.budget, self.max_context)
        if job is None:
            return []
        self.drafting = True
        return [RunDraft(job)]

    def _merge(self, job: DraftJob) -> None:
        """Add a finished job's candidates to the tree, merging by token path.

        The root may have moved on while the job ran. A candidate whose parent got committed is still a valid
        draft when its token is the one that was committed next: it then stands for that committed position,
        or for the current root, and its own children become the root's children.
        """
        places: list[_Place] = []  # per candidate, where it landed
        for cand in job.candidates:
            parent = places[cand.parent_cand] if cand.parent_cand >= 0 else self._place_of(cand.parent_id)
            places.append(self._child_place(parent, cand))

    def _place_of(self, node_id: int) -> _Place:
        if self.tree.is_live(node_id):
            return node_id
        position = self.committed_positions.get(node_id)
        return None if position is None else CommittedAt(position)

    def _child_place(self, parent: _Place, cand: Candidate) -> _Place:
        match parent:
            case None:
                return None  # this branch died while the job ran
            case CommittedAt(position=committed_at):  # follow the committed sequence
                position = committed_at + 1
                if position >= len(self.committed) or self.committed[position] != cand.token:
                    return None
                return self.tree.root_id if position == self.tree.root.position else CommittedAt(position)
        if self.tree.nodes[parent].position + 1 >= self.max_context or len(self.tree) >= self.budget.max_tree:
            return None
        return self.tree.add_child(parent, cand.token, cand.logprob).id

    # -- prompt lookup: zero-cost candidates ----------------------------------------------------------------
    def _look_up(self) -> None:
        """Hang what followed the committed text's suffix earlier on under the root, as a chain merged by token
        path into the tree (a token the drafter proposed too keeps its node), scored by LookupScore."""
        length = self._policy.lookup_length()
        if not length:
            return
        node = self.tree.root
        for token in self.lookup.propose(length):
            if node.position + 1 >= self.max_context or len(self.tree) >= self.budget.max_tree:
                break
            known = token in node.children
            node = self.tree.add_child(node.id, token, self.lookup_score.logprob)
            if not known:
                self.looked_up.add(node.id)
                self.stats.lookup_proposed += 1

    def _score_lookups(self, root: Node, token: int) -> None:
        """The target chose `token` after `root`: each looked-up child of root was right or wrong."""
        for child_token, child in root.children.items():
            if child in self.looked_up:
                hit = child_token == token
                self.lookup_score.record(hit)
                self.stats.lookup_accepted += hit

    # -- endings --------------------------------------------------------------------------------------
    def _finish(self, reason: str, actions: list[Action]) -> list[Action]:
        self.finish_reason = reason
        return actions + [Finish(reason)]

    def _fail(self, reason: str, lost_stage: int | None = None) -> list[Action]:
        self.error = reason
        self.lost_stage = lost_stage
        self.finish_reason = f"error: {reason}"
        return [Finish(self.finish_reason)]
