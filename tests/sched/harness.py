"""FakePipeline: the head's Scheduler wired to N fake stages in memory, with an adversarial interleaving.

Tokens come from a fake target: a pure function of the token sequence. A fake stage's "KV cache" stores
(position, token) per slot; computing a row means reading the slots its mask makes visible, which must be
exactly the row's sequence: positions 0..pos with no gaps or duplicates. The "hidden state" a stage sends
on is that sequence, and every later stage must see the same one, so a wrong mask, a wrong compaction or a
wrong position anywhere shows up as a mismatch or as output that differs from sequential decoding.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from flowspec.sched.actions import BroadcastVerdict, EmitTokens, Finish, RunDraft, SendSegment
from flowspec.sched.budget import Budget, Mode
from flowspec.sched.events import DraftReady, Prefilled, SegmentReturned
from flowspec.sched.growth import DraftJob
from flowspec.sched.sampling import SamplingParams, choose_token
from flowspec.sched.scheduler import Scheduler
from flowspec.sched.stage import StageTree
from flowspec.sched.tree import CONTEXT

VOCAB = 16


def _hash(*parts: object) -> int:
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little")


def target_logits(sequence: Sequence[int], sharp: bool = True) -> torch.Tensor:
    """The fake target's next-token logits after `sequence`."""
    h = _hash("target", tuple(sequence))
    logits = torch.tensor([((h >> (4 * i)) & 15) / 4.0 for i in range(VOCAB)], dtype=torch.float32)
    if sharp:
        logits[h % VOCAB] += 10.0
    return logits


def draft_logprobs(sequence: Sequence[int], agreement: float, sharp: bool) -> torch.Tensor:
    """A fake drafter that prefers the target's argmax with probability `agreement` (per context)."""
    favourite = int(target_logits(sequence, sharp).argmax())
    if (_hash("draft", tuple(sequence)) % 1000) / 1000.0 >= agreement:
        favourite = (favourite + 1 + _hash("other", tuple(sequence)) % (VOCAB - 1)) % VOCAB
    logits = torch.full((VOCAB,), -3.0)
    logits[favourite] = 2.0
    logits[(favourite + 3) % VOCAB] = 0.5
    return torch.log_softmax(logits, -1)


class FakeDrafter:
    def __init__(self, agreement: float, sharp: bool) -> None:
        self.agreement, self.sharp = agreement, sharp
        self.context: list[int] = []
        self.scratch: list[tuple[int, int]] = []  # (token, parent scratch index)

    def sync(self, committed: Sequence[int]) -> None:
        self.context = list(committed)
        self.scratch = []

    def expand(self, tokens: Sequence[int], parents: Sequence[int], positions: Sequence[int]) -> torch.Tensor:
        rows = []
        for token, parent, position in zip(tokens, parents, positions):
            self.scratch.append((token, parent))
            path = self._path(len(self.scratch) - 1)
            assert len(self.context) + len(path) - 1 == position, "draft position disagrees with the tree"
            rows.append(draft_logprobs(self.context + path, self.agreement, self.sharp))
        return torch.stack(rows)

    def _path(self, index: int) -> list[int]:
        path = []
        while index >= 0:
            token, parent = self.scratch[index]
            path.append(token)
            index = parent
        return path[::-1]


def run_job(drafter: FakeDrafter, job: DraftJob) -> None:
    drafter.sync(job.context)
    while (request := job.next_request()) is not None:
        job.feed(drafter.expand(request.tokens, request.parents, request.positions))


@dataclass
class Message:
    after: int
    step: int
    ids: list[int]
    parents: list[int]
    positions: list[int]
    payload: list[object]  # tokens to V1, "hidden" (visible sequences) after


@dataclass
class FakeStage:
    index: int
    tree: StageTree
    cache: list[tuple[int, int]] = field(default_factory=list)  # (position, token) per slot
    inbox: deque[Message] = field(default_factory=deque)
    verdicts: deque[BroadcastVerdict] = field(default_factory=deque)

    def can_compute(self) -> bool:
        return bool(self.inbox) and self.inbox[0].after <= self.tree.applied

    def apply_verdict(self) -> None:
        v = self.verdicts.popleft()
        compaction = self.tree.apply_verdict(v.seq, v.commit, v.root, v.watermark)
        kept = [self.cache[s] for s in compaction.keep]
        self.cache = self.cache[: compaction.start] + kept
        assert len(self.cache) == self.tree.cache_len

    def compute(self) -> Message:
        msg = self.inbox.popleft()
        admission = self.tree.admit(msg.ids, msg.parents)
        out = Message(msg.after, msg.step, [], [], [], [])
        if admission.visible is None:
            return out
        assert admission.visible.shape[1] == len(self.cache) + len(admission.rows)
        for r in admission.rows:
            token = msg.payload[r] if self.index == 1 else msg.payload[r][-1]
            self.cache.append((msg.positions[r], token))
        for i, r in enumerate(admission.rows):
            seen = sorted(self.cache[j] for j in range(len(self.cache)) if admission.visible[i, j])
            assert [p for p, _ in seen] == list(range(msg.positions[r] + 1)), f"stage {self.index}: bad mask"
            sequence = [t for _, t in seen]
            if self.index > 1:
                assert sequence == msg.payload[r], f"stage {self.index} disagrees with stage {self.index - 1}"
            out.ids.append(msg.ids[r])
            out.parents.append(msg.parents[r])
            out.positions.append(msg.positions[r])
            out.payload.append(sequence)
        return out


class FakePipeline:
    """Head scheduler + drafter + N stages; `choose(n)` picks which of n enabled moves happens next."""

    def __init__(
        self,
        prompt: Sequence[int],
        budget: Budget,
        sampling: SamplingParams,
        max_new_tokens: int,
        agreement: float = 0.7,
        eos: Sequence[int] = (),
        sharp: bool = True,
        resume_prompt_len: int | None = None,
    ) -> None:
        """With `resume_prompt_len`, `prompt` is a previous attempt's committed tokens (Scheduler.resume)."""
        self.budget, self.sampling, self.sharp = budget, sampling, sharp
        self.drafter = FakeDrafter(agreement, sharp)
        self.stages = [FakeStage(k, StageTree()) for k in range(1, budget.num_stages + 1)]
        self.returned: deque[Message] = deque()
        self.jobs: deque[DraftJob] = deque()
        self.output: list[int] = []
        self.finished: str | None = None
        self.max_cache = 0
        context = list(prompt) if resume_prompt_len is None else list(prompt[:-1])
        for stage in self.stages:
            stage.tree.prefilled(len(context))
            stage.cache = [(i, t) for i, t in enumerate(context)]
        if resume_prompt_len is None:
            self.sched = Scheduler(prompt, budget, sampling, max_new_tokens, eos_ids=eos)
            self._apply(self.sched.handle(Prefilled(target_logits(prompt, sharp))))
        else:
            self.sched, actions = Scheduler.resume(resume_prompt_len, prompt, budget, sampling, max_new_tokens,
                                                   eos_ids=eos)
            self._apply(actions)

    def _apply(self, actions: list[object]) -> None:
        for action in actions:
            match action:
                case SendSegment():
                    self.stages[0].inbox.append(Message(action.after, action.step, list(action.ids),
                                                        list(action.parents), list(action.positions),
                                                        list(action.tokens)))
                case BroadcastVerdict():
                    for stage in self.stages:
                        stage.verdicts.append(action)
                case RunDraft(job=job):
                    self.jobs.append(job)
                case EmitTokens(tokens=tokens):
                    self.output.extend(tokens)
                case Finish(reason=reason):
                    self.finished = reason

    def moves(self) -> list[Callable[[], None]]:
        moves: list[Callable[[], None]] = []
        for stage in self.stages:
            if stage.verdicts:
                moves.append(lambda s=stage: s.apply_verdict())
            if stage.can_compute():
                moves.append(lambda s=stage: self._compute(s))
        if self.returned:
            moves.append(self._head_receive)
        if self.jobs:
            moves.append(self._head_draft)
        return moves

    def _compute(self, stage: FakeStage) -> None:
        out = stage.compute()
        if stage.index == len(self.stages):
            self.returned.append(out)
        else:
            self.stages[stage.index].inbox.append(out)
        self.max_cache = max(self.max_cache, len(stage.cache))

    def _head_receive(self) -> None:
        msg = self.returned.popleft()
        live = self.sched.live_rows(msg.ids)
        logits = torch.stack([target_logits(msg.payload[i], self.sharp) for i in live]) if live else \
            torch.zeros(0, VOCAB)
        self._apply(self.sched.handle(SegmentReturned(msg.step, tuple(msg.ids[i] for i in live), logits)))

    def _head_draft(self) -> None:
        job = self.jobs.popleft()
        run_job(self.drafter, job)
        self._apply(self.sched.handle(DraftReady(job)))

    def run(self, choose: Callable[[int], int], max_moves: int = 20000) -> list[int]:
        for _ in range(max_moves):
            if self.finished:
                return self.output
            moves = self.moves()
            assert moves, "deadlock: nothing can move but the request is not finished"
            moves[choose(len(moves))]()
            self.check_invariants()
        raise AssertionError("did not finish")

    def check_invariants(self) -> None:
        s = self.sched
        if s.done:
            return
        assert not s.idle, f"the scheduler waits for nothing ({s.describe_waiting()})"
        tree = s.tree
        for node in tree.nodes.values():  # I1 topological order
            assert node.parent == CONTEXT or node.parent < node.id or node.id == tree.root_id
        root = tree.root  # I8 the root is the last committed token, at the next position
        assert root.token == s.committed[-1] and root.position == len(s.committed) - 1
        assert len(s.in_flight) <= self.budget.slots  # I5 slots are conserved
        assert len(tree) <= self.budget.max_tree
        for stage in self.stages:
            st = stage.tree
            # I2/I7 the context is exactly the committed prefix, in order, at its own positions
            assert st.context_len <= len(s.committed) - 1
            assert stage.cache[: st.context_len] == [(i, t) for i, t in enumerate(s.committed[: st.context_len])]
            # I3 tree slots sit after the context, parents before children
            assert len(stage.cache) == st.cache_len
            for slot, node_id in enumerate(st.slots):
                parent = st.parent[node_id]
                assert parent == -1 or parent in st.slots[:slot] or parent < node_id
            assert len(stage.cache) <= len(s.committed) + self.budget.tree_slack


def sequential_oracle(prompt: Sequence[int], sampling: SamplingParams, max_new: int, eos: Sequence[int] = (),
                      sharp: bool = True) -> list[int]:
    """What decoding one token at a time with the fake target produces."""
    sequence = list(prompt)
    out: list[int] = []
    for _ in range(max_new):
        token = choose_token(target_logits(sequence, sharp), sampling, len(sequence))
        sequence.append(token)
        out.append(token)
        if token in eos:
            break
    return out


def budget_for(mode: Mode, stages: int, **overrides: int | bool) -> Budget:
    return Budget(mode=mode, num_stages=stages, **overrides)
