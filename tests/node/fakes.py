"""In-memory stand-ins for the head's shell: stage links that answer from a script, and a target that counts.

httpcore's MockStream is the model: `FakeStages` speaks `StageLinks`' interface to a `RequestDriver` or a
`HeadNode`, with no socket, process or model. The pipeline it fakes computes the "counting" target: the next
token after t is (t + 1) mod VOCAB, so every greedy answer is known in advance. A test scripts how the stages
behave (answer, stall, lose a link, answer garbage) and can hold any send at a gate to cancel the caller there.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from flowspec.errors import StageFailed
from flowspec.net import Close, Limits, Message, Open, Prefill, Segment, Verdict
from flowspec.node.links import Inbox, LinkLost
from flowspec.sched import StageLost

VOCAB = 16


def counting_answer(last: int, n: int) -> list[int]:
    """What the counting target generates after `last`, n tokens."""
    return [(last + i) % VOCAB for i in range(1, n + 1)]


class CountingHead:
    """The lm_head of the counting target: a hidden row one-hot at t gives logits peaked at t + 1."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.roll(hidden.float(), shifts=1, dims=-1) * 10.0


def hidden_of(tokens: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.one_hot(tokens.long() % VOCAB, VOCAB).float()


@dataclass
class Script:
    """How the fake pipeline behaves. Each hook gets the message stage 1 received and returns what the last
    stage sends back (None: nothing, a stall)."""

    on_prefill: Callable[[Prefill], Message | None] = lambda p: Prefill(p.req, p.chunk, p.last, p.start,
                                                                        hidden_of(p.x))
    on_segment: Callable[[Segment], Message | None] = lambda s: Segment(s.req, s.step, s.after, s.ids, s.parents,
                                                                        s.pos, hidden_of(s.x))
    gates: dict[str, asyncio.Event] = field(default_factory=dict)  # message kind -> hold its send until set
    reached: dict[str, asyncio.Event] = field(default_factory=dict)  # message kind -> set when a send waits


class FakeStages:
    """`StageLinks` for a pipeline of `num_stages` fake stages (see the module docstring)."""

    def __init__(self, num_stages: int = 2, script: Script | None = None, *, recovery_ok: bool = True) -> None:
        self.num_stages = num_stages
        self.script = script or Script()
        self.limits = Limits.for_model(VOCAB, VOCAB, 4096, max_rows=64)
        self.links: list[object] = [object()] * num_stages  # HeadNode only checks that there are links
        self.generation = 0
        self.sent: list[tuple[int, Message]] = []
        self.up = True
        self.recovery_ok = recovery_ok
        self.recoveries: list[int] = []
        self.lose_on_send: set[str] = set()  # kinds whose next send finds the link gone (LinkLost)
        self._inboxes: dict[int, Inbox] = {}
        self._next_req = 1

    # the part of StageLinks a driver uses ----------------------------------------------------------------
    @property
    def all_up(self) -> bool:
        return self.up

    @property
    def open_requests(self) -> int:
        return len(self._inboxes)

    def open_inbox(self) -> tuple[int, Inbox]:
        req, self._next_req = self._next_req, self._next_req + 1
        inbox = self._inboxes[req] = Inbox()
        return req, inbox

    def close_inbox(self, req: int) -> None:
        self._inboxes.pop(req, None)

    async def send(self, k: int, msg: Message) -> None:
        await self._gate(msg.kind)
        if msg.kind in self.lose_on_send:
            self.lose_on_send.discard(msg.kind)
            self.up = False
            raise LinkLost(k, "connection reset by peer")
        self.sent.append((k, msg))
        inbox = self._inboxes.get(getattr(msg, "req", -1))
        if inbox is None or k != 1:
            return
        answer = None
        match msg:
            case Prefill():
                answer = self.script.on_prefill(msg)
            case Segment():
                answer = self.script.on_segment(msg)
        if answer is not None:
            asyncio.get_running_loop().call_soon(inbox.items.put_nowait, answer)

    async def send_quietly(self, msg: Message) -> None:
        await self._gate(msg.kind)
        for k in range(1, self.num_stages + 1):
            self.sent.append((k, msg))
        inbox = self._inboxes.get(getattr(msg, "req", -1))
        if isinstance(msg, Close) and inbox is not None and self.up:
            for k in range(1, self.num_stages + 1):
                inbox.stats[k] = []
                inbox.memory[k] = {"weights": 0, "kv": 0, "rss": 0}
            inbox.stats_done.set()

    async def _gate(self, kind: str) -> None:
        gate = self.script.gates.get(kind)
        if gate is not None:
            reached = self.script.reached.setdefault(kind, asyncio.Event())
            reached.set()
            await gate.wait()

    # the part a HeadNode uses ------------------------------------------------------------------------------
    async def recover(self, k: int, reason: str, generation: int | None = None) -> None:
        self.recoveries.append(k)
        await asyncio.sleep(0)
        if not self.recovery_ok:
            raise StageFailed(f"stage {k} lost ({reason}) and no replacement came")
        self.up = True
        self.generation += 1

    async def connect(self) -> None:
        pass

    async def aclose(self) -> None:
        pass

    # what tests ask --------------------------------------------------------------------------------------
    def lose(self, k: int, reason: str = "connection reset by peer") -> None:
        """Stage k's link breaks now: every open request hears StageLost, as StageLinks' readers report it."""
        self.up = False
        for inbox in self._inboxes.values():
            inbox.items.put_nowait(StageLost(k, reason))

    def kinds(self, stage: int = 1) -> list[str]:
        return [msg.kind for k, msg in self.sent if k == stage]

    def closed(self, req: int) -> bool:
        return all(any(isinstance(m, Close) and m.req == req for k2, m in self.sent if k2 == k)
                   for k in range(1, self.num_stages + 1))

    def opened(self) -> list[int]:
        return sorted({m.req for _, m in self.sent if isinstance(m, Open)})

    def verdicts(self) -> list[Verdict]:
        return [m for k, m in self.sent if k == 1 and isinstance(m, Verdict)]


class CountingDraft:
    """A request's drafting state that proposes what the counting target will say (with `agree` False: one
    token off, so every draft is rejected). `fail_at` makes the n-th expand raise, as a drafter bug would."""

    def __init__(self, agree: bool = True, fail_at: int | None = None) -> None:
        self.agree, self.fail_at, self.expands = agree, fail_at, 0

    @property
    def pending(self) -> int:
        return 0

    def sync(self, committed: object) -> None:
        pass

    def reset_scratch(self) -> None:
        pass

    def begin_job(self) -> None:
        pass

    def rows_to_forward(self, tokens: object, parents: object) -> int:
        return 1

    def expand(self, tokens: list[int], parents: list[int], positions: list[int]) -> torch.Tensor:
        self.expands += 1
        if self.fail_at is not None and self.expands >= self.fail_at:
            raise RuntimeError("drafter exploded")
        shift = 1 if self.agree else 2
        nxt = (torch.tensor(tokens) + shift) % VOCAB
        return torch.log_softmax(torch.nn.functional.one_hot(nxt, VOCAB).float() * 10.0, dim=-1)


class CountingDrafter:
    def __init__(self, **state: object) -> None:
        self.state = state

    def new_state(self, capacity: int | None = None) -> CountingDraft:
        return CountingDraft(**self.state)  # type: ignore[arg-type]
