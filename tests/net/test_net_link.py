"""The async shell on real loopback sockets: handshake, echo, bad clients dropped while others keep working,
heartbeats, timeouts, sticky errors, the pending-connection bound, and cleanup."""

from __future__ import annotations

import asyncio
import os
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace

import pytest
import structlog
import torch

from flowspec.compat import timeout
from flowspec.errors import AuthError, StageFailed, StageTimeout
from flowspec.net import (
    HANDSHAKE_LIMITS,
    FrameDecoder,
    Handshake,
    HandshakeState,
    Hello,
    Limits,
    Link,
    PendingHandshakes,
    Ping,
    Pong,
    Segment,
    Timeouts,
    Verdict,
    connect,
    encode_frame,
    parse_message,
    serve,
)

LIMITS = Limits.for_model(hidden_size=16, vocab_size=1000, max_positions=4096, max_rows=32)
FAST = Timeouts(connect=2.0, handshake=2.0, frame=1.0, heartbeat_interval=0.1, heartbeat_timeout=0.6)
STAGE = Hello(version=1, role="stage", index=1, fingerprint="fp-1", nonce=bytes(16))
HEAD = Hello(version=1, role="head", index=0, fingerprint="fp-1", nonce=bytes(16))


async def echo(link: Link) -> None:
    while True:
        await link.send(await link.recv())


Server = tuple[asyncio.Server, int]


@pytest.fixture
async def start_server() -> AsyncIterator[Callable[..., Awaitable[Server]]]:
    servers: list[asyncio.Server] = []

    async def start(on_link: Callable[[Link], Awaitable[None]] = echo, **kw: object) -> Server:
        opts: dict[str, object] = {"hello": STAGE, "secret": None, "limits": LIMITS, "timeouts": FAST}
        opts.update(kw)
        server = await serve("127.0.0.1", 0, on_link=on_link, **opts)  # type: ignore[arg-type]
        servers.append(server)
        return server, server.sockets[0].getsockname()[1]

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


async def client(port: int, secret: bytes | None = None, **kw: object) -> Link:
    opts: dict[str, object] = {"hello": HEAD, "expect_index": 1, "secret": secret, "limits": LIMITS,
                               "timeouts": FAST}
    opts.update(kw)
    return await connect("127.0.0.1", port, **opts)  # type: ignore[arg-type]


def segment(n: int = 3) -> Segment:
    ar = torch.arange(n, dtype=torch.int64)
    return Segment(req=1, step=2, after=0, ids=ar, parents=ar - 1, pos=ar + 10, x=torch.randn(n, 16))


async def raw_handshake(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Authenticate with the pure Handshake over a bare socket, so the test can then misbehave."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    hs = Handshake(replace(HEAD, nonce=os.urandom(16)), secret=None, acceptor=False, expect_index=1)
    decoder = FrameDecoder(HANDSHAKE_LIMITS)
    out = hs.start()
    while True:
        for msg in out:
            writer.write(encode_frame(msg.to_wire()))
        if hs.state is HandshakeState.DONE:
            return reader, writer
        assert hs.state is not HandshakeState.FAILED
        raw = decoder.next_message()
        while raw is None:
            decoder.feed(await reader.read(1))  # one byte at a time: never swallow a byte after 'ready'
            raw = decoder.next_message()
        out = hs.receive(parse_message(raw, HANDSHAKE_LIMITS))


async def test_echo_roundtrip_and_counters(start_server: Callable[..., Awaitable[Server]]) -> None:
    _, port = await start_server()
    async with await client(port) as link:
        assert link.peer.index == 1 and link.peer.role == "stage"
        sent = segment()
        await link.send(sent)
        got = await link.recv(timeout_s=2)
        assert isinstance(got, Segment) and torch.equal(got.x, sent.x) and torch.equal(got.parents, sent.parents)
        assert link.frames_sent == 1 and link.bytes_sent == len(encode_frame(sent.to_wire()))


async def test_secret_handshake_live(start_server: Callable[..., Awaitable[Server]]) -> None:
    _, port = await start_server(secret=b"s3cret-s3cret-s3cret")
    async with await client(port, secret=b"s3cret-s3cret-s3cret") as link:
        await link.send(Verdict(req=1, seq=1, commit=torch.tensor([0]), root=0, watermark=0))
        assert isinstance(await link.recv(timeout_s=2), Verdict)
    with structlog.testing.capture_logs() as logs:
        with pytest.raises(AuthError, match="different shared secret|shared secrets differ"):
            await client(port, secret=b"wrong-wrong-wrong")
        await asyncio.sleep(0.05)
    assert any(e["event"] == "net.handshake_failed" and "127.0.0.1" in e["peer"] for e in logs)


async def test_fingerprint_mismatch_live(start_server: Callable[..., Awaitable[Server]]) -> None:
    _, port = await start_server()
    with pytest.raises(AuthError, match="model fingerprint mismatch"):
        await client(port, hello=replace(HEAD, fingerprint="other"))
    with pytest.raises(AuthError, match="expected to reach stage 4"):
        await client(port, expect_index=4)


async def test_connection_refused_is_stage_failed() -> None:
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    with pytest.raises(StageFailed, match=f"cannot reach stage 1 at 127.0.0.1:{port}"):
        await client(port)


BAD_INPUT = {
    "garbage": b"\x00\x00\x00\x05\xc1\xc1\xc1\xc1\xc1",
    "oversized": struct.pack(">I", LIMITS.max_frame_bytes + 1),
    "bad schema": encode_frame({"t": "segment", "req": 1}),
    "hello again": encode_frame(HEAD.to_wire()),
}


@pytest.mark.parametrize("kind", list(BAD_INPUT))
async def test_bad_client_dropped_good_client_served(start_server: Callable[..., Awaitable[Server]],
                                                     kind: str) -> None:
    _, port = await start_server()
    good = await client(port)
    with structlog.testing.capture_logs() as logs:
        reader, writer = await raw_handshake(port)
        writer.write(BAD_INPUT[kind])
        rest = await asyncio.wait_for(reader.read(), 2)  # server answers with a refuse, then closes
        writer.close()
        await asyncio.sleep(0.05)
    assert b"refuse" in rest
    failed = [e for e in logs if e["event"] == "net.link_failed"]
    assert failed and failed[0]["error"] == "PeerProtocolError" and failed[0]["peer"].startswith("127.0.0.1:")
    await good.send(Ping(n=7))  # the ping is answered by the server link itself
    await good.send(segment())
    assert isinstance(await good.recv(timeout_s=2), Segment)
    await good.close()


async def test_garbage_before_handshake_logged(start_server: Callable[..., Awaitable[Server]]) -> None:
    _, port = await start_server()
    with structlog.testing.capture_logs() as logs:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\n\r\n")
        await asyncio.wait_for(reader.read(), 2)
        writer.close()
        await asyncio.sleep(0.05)
    [event] = [e for e in logs if e["event"] == "net.handshake_failed"]
    assert "exceeds" in event["reason"] and event["peer"].startswith("127.0.0.1:")


async def test_truncated_frame_times_out(start_server: Callable[..., Awaitable[Server]]) -> None:
    results: list[BaseException] = []

    async def record(link: Link) -> None:
        try:
            await link.recv()
        except Exception as exc:
            results.append(exc)

    _, port = await start_server(record, timeouts=replace(FAST, frame=0.3, heartbeat_timeout=5.0))
    reader, writer = await raw_handshake(port)
    writer.write(struct.pack(">I", 100) + b"\x88" * 10)  # frame starts, rest never comes
    await asyncio.wait_for(reader.read(), 3)
    writer.close()
    assert len(results) == 1 and isinstance(results[0], StageTimeout)
    assert "frame not completed" in str(results[0])


async def test_silent_peer_detected_by_heartbeat() -> None:
    """A stage that completes the handshake and then never sends a byte (not even pongs)."""
    holder: list[asyncio.StreamWriter] = []

    async def mute_stage(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        hs = Handshake(replace(STAGE, nonce=os.urandom(16)), secret=None, acceptor=True)
        decoder = FrameDecoder(HANDSHAKE_LIMITS)
        out = hs.start()
        while True:
            for msg in out:
                w.write(encode_frame(msg.to_wire()))
            if hs.state is HandshakeState.DONE:
                break
            decoder.feed(await r.read(1))
            if (raw := decoder.next_message()) is not None:
                out = hs.receive(parse_message(raw, HANDSHAKE_LIMITS))
            else:
                out = []
        holder.append(w)
        await asyncio.sleep(5)

    mute = await asyncio.start_server(mute_stage, "127.0.0.1", 0)
    try:
        link = await client(mute.sockets[0].getsockname()[1])
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(StageTimeout, match="heartbeat: no data"):
            await link.recv(timeout_s=5)
        assert FAST.heartbeat_timeout <= loop.time() - t0 < 3
        with pytest.raises(StageTimeout, match="heartbeat"):  # sticky
            await link.send(Ping(n=1))
        await link.close()
    finally:
        for w in holder:
            w.close()
        mute.close()
        await mute.wait_closed()


async def test_pings_keep_an_idle_link_alive(start_server: Callable[..., Awaitable[Server]]) -> None:
    _, port = await start_server()
    link = await client(port)
    with pytest.raises(StageTimeout, match="waiting for a message"):
        await link.recv(timeout_s=3 * FAST.heartbeat_timeout)  # idle, but pongs keep arriving
    assert link.error is None and link.frames_sent >= 10
    await link.send(segment())
    assert isinstance(await link.recv(timeout_s=2), Segment)
    await link.close()


async def test_peer_close_is_stage_failed_and_close_is_idempotent(
        start_server: Callable[..., Awaitable[Server]]) -> None:
    async def hang_up(link: Link) -> None:
        await link.recv()

    _, port = await start_server(hang_up)
    link = await client(port)
    await link.send(Pong(n=1))  # pongs are swallowed by the server link; recv keeps waiting
    await link.send(segment())
    with pytest.raises(StageFailed):
        await link.recv(timeout_s=2)
    await link.close()
    await link.close()
    with pytest.raises(StageFailed):
        await link.send(segment())


async def test_a_full_pending_set_drops_its_oldest(start_server: Callable[..., Awaitable[Server]]) -> None:
    """A newcomer is never refused: it takes the place of the oldest pending connection."""
    gate = PendingHandshakes(limit=2)
    _, port = await start_server(pending=gate)
    with structlog.testing.capture_logs() as logs:
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
        await asyncio.sleep(0.05)
        newcomer = await asyncio.open_connection("127.0.0.1", port)
        first_addr = idle[0][1].get_extra_info("sockname")
        # the oldest is dropped at once (its hello would be due only after Timeouts.hello = 1 s) ...
        assert b"hello" in await hung_up(idle[0][0], 0.5)  # the stage's hello, then nothing
        # ... the others keep their places (each has been sent the stage's hello, and nothing else)
        for reader, _ in (idle[1], newcomer):
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(reader.read(), 0.1)
        assert len(gate) == 2
        async with await client(port) as link:  # takes the place of the next oldest, and is served
            await link.send(segment())
            assert isinstance(await link.recv(timeout_s=2), Segment)
    [evicted, *_] = [e for e in logs if e["event"] == "net.evicted"]
    assert evicted["peer"] == f"{first_addr[0]}:{first_addr[1]}" and "make room" in evicted["reason"]
    assert not [e for e in logs if e["event"] == "net.handshake_failed" and e["peer"] == evicted["peer"]]
    for _, w in (*idle, newcomer):
        w.close()
    await until_no_pending(gate)


async def hung_up(reader: asyncio.StreamReader, within: float) -> bytes:
    """Everything the server sends until it closes the connection: with a FIN, or with a reset when bytes it had
    not read yet were still arriving."""
    data = b""
    async with timeout(within):
        try:
            while chunk := await reader.read(1 << 16):
                data += chunk
        except ConnectionResetError:
            pass
    return data


async def until_no_pending(gate: PendingHandshakes, within: float = 3.0) -> None:
    async with timeout(within):
        while len(gate):
            await asyncio.sleep(0.02)


async def test_no_tasks_leak_after_close(start_server: Callable[..., Awaitable[Server]]) -> None:
    _, port = await start_server()
    before = asyncio.all_tasks()
    link = await client(port)
    await link.send(segment())
    await link.recv(timeout_s=2)
    await link.close()
    await asyncio.sleep(0.05)
    leaked = {t for t in asyncio.all_tasks() - before if "link 127.0.0.1" in t.get_name() and not t.done()}
    assert not leaked


async def test_cancelled_recv_leaves_link_usable(start_server: Callable[..., Awaitable[Server]]) -> None:
    _, port = await start_server()
    async with await client(port) as link:
        task = asyncio.create_task(link.recv())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await link.send(segment())
        assert isinstance(await link.recv(timeout_s=2), Segment)
