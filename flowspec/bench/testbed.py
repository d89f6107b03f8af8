"""The emulated edge testbed: a `Backend` whose work takes a device profile's time and whose links are shaped.

Everything that emulates lives here and plugs into the product through its one seam, `flowspec.node.Backend`:

* `EmulatedBackend.charge` runs on the node's compute thread after each piece of work: a step that finished
  early sleeps there until `profile cost × dilation`, so everything sharing the thread (a stage's forwards;
  the head's lm_head and drafter: one device) is serialized exactly as on the emulated device. A step whose
  real compute exceeded that is an overrun, counted per kind and reported, never hidden.
* `ShapedNetwork` gives the ring's outgoing hop of each node (head → V1, Vk → Vk+1, VN → head) a transport
  that delivers frames as the emulated link would, and charges hidden-state rows at the profiled model's size.
  Each hop is shaped by exactly one side, its sender.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from flowspec.bench.profiles import Profile
from flowspec.bench.shaping import LinkShape, Shaper
from flowspec.net import Hello, Message, Network, Transport
from flowspec.node.backend import Backend, Work, WorkKind

__all__ = ["EmulatedBackend", "Ledger", "ShapedNetwork", "work_cost"]


def work_cost(profile: Profile, work: Work) -> float:
    """Seconds `work` takes on the profiled device."""
    match work.kind:
        case WorkKind.STAGE_FORWARD:
            return profile.stage_cost(work.rows, work.context)
        case WorkKind.LM_HEAD:
            return profile.head_step_cost(work.rows)
        case WorkKind.DRAFT_SYNC:
            # the drafter only records the new context; its rows ride in the next level's forward
            return profile.tree_build
        case WorkKind.DRAFT_LEVEL:
            # the pending context pass rides in this level's forward: its per-token part, not a second fixed cost
            extra = max(0.0, profile.draft_context_cost(work.context) - profile.draft_level_cost(0))
            return profile.draft_level_cost(work.rows) + extra
    raise AssertionError(work.kind)  # pragma: no cover


@dataclass
class Ledger:
    """What pacing did: steps and overruns per work kind, real and paced seconds, the worst real/paced ratio."""

    steps: Counter[str] = field(default_factory=Counter)
    overruns: Counter[str] = field(default_factory=Counter)
    real_s: float = 0.0
    paced_s: float = 0.0
    worst_ratio: float = 0.0


class _ShapedTransport(Transport):
    def __init__(self, network: ShapedNetwork, shape: LinkShape | None) -> None:
        self.network, self.shaper = network, Shaper(shape) if shape is not None else None

    def deliver_at(self, msg: Message, frame_len: int, now: float) -> float | None:
        charged = self.network.profile.wire_bytes(msg, frame_len) if self.shaper is not None else frame_len
        self.network.bytes_real += frame_len
        self.network.bytes_charged += charged
        return self.shaper.deliver_at(now, charged) if self.shaper is not None else None


class ShapedNetwork(Network):
    """Shapes each node's outgoing ring hop to `shape` (already dilated); counts real and charged bytes."""

    def __init__(self, profile: Profile, shape: LinkShape | None, num_stages: int) -> None:
        self.profile, self.shape, self.num_stages = profile, shape, num_stages
        self.bytes_real = 0
        self.bytes_charged = 0

    def is_ring_hop(self, local: Hello, peer: Hello) -> bool:
        if local.role == "head":
            return peer.index == 1
        return (peer.role == "stage" and peer.index == local.index + 1) or (
            peer.role == "head" and local.index == self.num_stages)

    def transport(self, local: Hello, peer: Hello) -> Transport:
        return _ShapedTransport(self, self.shape if self.is_ring_hop(local, peer) else None)


class EmulatedBackend(Backend):
    """A node of the emulated testbed: work paced to `profile` × `dilation`, ring hop shaped to `link`.

    `busy` records every paced step as (start, end, kind) for timelines and busy fractions; with a
    `stats_file`, each finished request appends one JSON line of what pacing and the links did meanwhile.
    """

    def __init__(self, profile: Profile, dilation: float, *, num_stages: int, link: LinkShape | None = None,
                 name: str = "", stats_file: str | None = None) -> None:
        super().__init__()
        self.profile, self.dilation, self.name, self.stats_file = profile, dilation, name, stats_file
        self.shaped = ShapedNetwork(profile, link.scaled(dilation) if link else None, num_stages)
        self.network = self.shaped
        self.ledger = Ledger()
        self.busy: list[tuple[float, float, str]] = []
        self._lock = threading.Lock()
        self._reported = (Counter[str](), Counter[str](), 0, 0)  # overruns, steps, bytes real, charged

    def charge(self, work: Work, start: float, end: float) -> float:
        budget = work_cost(self.profile, work) * self.dilation
        real = end - start
        with self._lock:
            ledger = self.ledger
            ledger.steps[work.kind.value] += 1
            ledger.real_s += real
            ledger.paced_s += budget
            if budget > 0:
                ledger.worst_ratio = max(ledger.worst_ratio, real / budget)
            over = real > budget
            if over:
                ledger.overruns[work.kind.value] += 1
        target = end if over else start + budget
        delay = target - time.monotonic()
        if delay > 0:
            time.sleep(delay)  # on the compute thread: the device is busy until then
        self.busy.append((start, target, work.kind.value))
        return target

    def report(self) -> dict[str, Any]:
        """Overruns, paced steps and link bytes since the last report (requests run one at a time)."""
        with self._lock:
            over, steps = Counter(self.ledger.overruns), Counter(self.ledger.steps)
        real, charged = self.shaped.bytes_real, self.shaped.bytes_charged
        over0, steps0, real0, charged0 = self._reported
        self._reported = (over, steps, real, charged)
        return {"node": self.name, "overruns": sum((over - over0).values()),
                "overruns_by_kind": dict(over - over0), "paced_steps": sum((steps - steps0).values()),
                "bytes_sent": real - real0, "bytes_charged": charged - charged0,
                "worst_ratio": round(self.ledger.worst_ratio, 3)}

    def request_closed(self, req: int) -> None:
        if self.stats_file:
            with open(self.stats_file, "a") as out:
                out.write(json.dumps({"req": req, **self.report()}) + "\n")
