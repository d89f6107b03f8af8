"""Connecting to a peer that may not be up yet: capped exponential backoff with jitter, until a deadline.

Devices boot in any order (a Pi takes 30-60 s, a service manager restarts a node), so the head's first connect
to a stage, every reconnect, and a stage's connect to its successor keep trying a peer that is unreachable.
A peer that answers but is the wrong one (another model, split or format, a wrong secret, a wrong index, a TLS
mismatch) is refused at once: retrying cannot fix a peers file.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import final

from flowspec.errors import FlowSpecError, PeerProtocolError
from flowspec.net.link import Link, format_address

__all__ = ["Backoff", "connect_retrying", "format_address"]

WaitCallback = Callable[[str, float, str], None]  # (address, seconds waited so far, last error)


@final
@dataclass(frozen=True, slots=True)
class Backoff:
    """Delays between tries: doubling from `first` up to `cap`, each drawn uniformly from [d/2, d] so that
    several heads (or every stage after a switch reboots) do not retry in lockstep."""

    first: float = 0.1
    cap: float = 2.0

    def delays(self, rng: random.Random | None = None) -> Iterator[float]:
        draw = rng or random.Random()
        delay = self.first
        while True:
            yield draw.uniform(delay / 2, delay)
            delay = min(delay * 2, self.cap)


async def connect_retrying(addresses: Sequence[tuple[str, int]], connect_one: Callable[[str, int], Awaitable[Link]],
                           *, deadline: float, backoff: Backoff = Backoff(),
                           on_wait: WaitCallback | None = None) -> Link:
    """The first of `addresses` that answers, tried in order, round after round, until `deadline` (a
    `time.monotonic()` value; one round at least). Unreachable peers (refused, timed out, closed mid-handshake)
    are retried; a peer that refuses the handshake (PeerProtocolError: fingerprint, secret, index) fails at once.
    `on_wait(address, waited_s, error)` is told of every failed round."""
    started = time.monotonic()
    last: FlowSpecError | None = None
    for delay in backoff.delays():
        for host, port in addresses:
            try:
                return await connect_one(host, port)
            except PeerProtocolError:
                raise
            except FlowSpecError as exc:
                last = exc
        now = time.monotonic()
        if on_wait is not None:
            on_wait(format_address(*addresses[0]), now - started, str(last))
        if now >= deadline:
            break
        await asyncio.sleep(min(delay, deadline - now))  # so the last try falls on the deadline
    assert last is not None
    raise last
