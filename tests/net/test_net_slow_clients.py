"""Hostile clients that are slow, not malformed: connections that send nothing, one byte at a time, or a length
prefix and then nothing. However many hold a stage's pending places, a real head's handshake is not held up,
each slow connection is dropped once its hello is overdue (Timeouts.hello), and none is left pending after.

The time bounds here are behavioural, not speed goals: a handshake on loopback takes milliseconds, and the
bound (1.5 s) only has to tell "served at once" from "served once a slot frees up" (Timeouts.hello = 1 s, or
the 5 s handshake deadline that used to be the only one) on a loaded CI machine.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import structlog

from flowspec.compat import TaskGroup
from flowspec.net import HANDSHAKE_LIMITS, PendingHandshakes, Segment, Timeouts, encode_frame, serve
from tests.net.test_net_link import HEAD, LIMITS, STAGE, client, echo, hung_up, segment, until_no_pending

HOSTILE = 70  # more than the 64 pending places a stage keeps
TIMEOUTS = Timeouts(handshake=5.0, hello=1.0)
BOUND_S = 1.5
Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def silent(writer: asyncio.StreamWriter) -> None:
    await asyncio.sleep(3600)


async def dribble(writer: asyncio.StreamWriter) -> None:
    """A real hello, one byte every 200 ms: its frame never completes before the deadline."""
    for byte in encode_frame(HEAD.to_wire()):
        writer.write(bytes([byte]))
        await asyncio.sleep(0.2)


async def prefix_only(writer: asyncio.StreamWriter) -> None:
    """A length prefix as large as a handshake frame may be, then nothing: the body is never allocated."""
    writer.write(struct.pack(">I", HANDSHAKE_LIMITS.max_frame_bytes))
    await asyncio.sleep(3600)


KINDS: dict[str, Callable[[asyncio.StreamWriter], Awaitable[None]]] = {
    "silent": silent, "one byte per 200 ms": dribble, "length prefix then nothing": prefix_only}


@pytest.fixture
async def stage() -> AsyncIterator[tuple[int, PendingHandshakes]]:
    gate = PendingHandshakes()
    server = await serve("127.0.0.1", 0, hello=STAGE, secret=None, limits=LIMITS, timeouts=TIMEOUTS, on_link=echo,
                         pending=gate)
    yield server.sockets[0].getsockname()[1], gate
    server.close()
    await server.wait_closed()


async def misbehave(conn: Connection, how: Callable[[asyncio.StreamWriter], Awaitable[None]]) -> None:
    try:
        await how(conn[1])
    except OSError:
        pass  # the stage hung up on it: that is the point


@pytest.mark.parametrize("kind", list(KINDS))
async def test_slow_clients_do_not_hold_up_a_real_handshake(stage: tuple[int, PendingHandshakes], kind: str) -> None:
    port, gate = stage
    loop = asyncio.get_running_loop()
    conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(HOSTILE)]
    try:
        async with TaskGroup() as tg:
            tasks = [tg.create_task(misbehave(conn, KINDS[kind])) for conn in conns]
            await asyncio.sleep(0.1)  # every one accepted: the pending places are full
            assert len(gate) == gate.limit
            start = loop.time()
            link = await client(port, timeouts=TIMEOUTS)
            took = loop.time() - start
            async with link:
                await link.send(segment())
                assert isinstance(await link.recv(timeout_s=2), Segment)
            assert took < BOUND_S, f"handshake took {took:.2f} s behind {HOSTILE} {kind} connections"
            for task in tasks:
                task.cancel()
    finally:
        for _, writer in conns:
            writer.close()
    await until_no_pending(gate)


@pytest.mark.parametrize("kind", list(KINDS))
async def test_an_overdue_hello_gives_the_place_back(stage: tuple[int, PendingHandshakes], kind: str) -> None:
    """Dropped after Timeouts.hello (1 s), not after the whole handshake's 5 s, and logged with why."""
    port, gate = stage
    loop = asyncio.get_running_loop()
    with structlog.testing.capture_logs() as logs:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        async with TaskGroup() as tg:
            task = tg.create_task(misbehave((reader, writer), KINDS[kind]))
            start = loop.time()
            await hung_up(reader, 4)
            took = loop.time() - start
            task.cancel()
        writer.close()
        await until_no_pending(gate)
    assert TIMEOUTS.hello - 0.1 < took < TIMEOUTS.hello + 1.0, took
    [failed] = [e for e in logs if e["event"] == "net.handshake_failed"]
    assert failed["error"] == "StageTimeout" and "no hello within 1 s" in failed["reason"], failed
