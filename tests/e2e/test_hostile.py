"""Bad input against a live `flowspec-node` process: each bad connection is dropped with a logged reason, and
the node keeps serving well-behaved clients (a real generation runs through it afterwards). Handshakes with a
wrong secret or a wrong model split are refused with a clear message."""

from __future__ import annotations

import asyncio
import os
import struct
import time
from dataclasses import replace
from typing import Any

import msgpack
import pytest
import torch

from flowspec.api import Cluster, Request
from flowspec.config import parse_peers
from flowspec.errors import AuthError
from flowspec.net import (
    HANDSHAKE_LIMITS,
    Error,
    Handshake,
    HandshakeState,
    Open,
    Prefill,
    Timeouts,
    connect,
    encode_frame,
    parse_message,
)
from flowspec.net.framing import decode_body
from flowspec.node.build import deployment
from flowspec.node.local import LocalCluster
from tests.e2e.conftest import SMOL, Stages, log_events, start_sync

N = 2  # stages of the shared cluster these tests attack


async def raw_client(port: int, handshake: bool = True) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TCP connection to stage 1, optionally after a correct head handshake (driven by hand)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    if not handshake:
        return reader, writer
    hello = deployment(SMOL, N).hello("head", 0)
    hs = Handshake(replace(hello, nonce=os.urandom(16)), secret=None, acceptor=False, expect_index=1)
    out = hs.start()
    while True:
        for msg in out:
            writer.write(encode_frame(msg.to_wire()))
        await writer.drain()
        if hs.state in (HandshakeState.DONE, HandshakeState.FAILED):
            break
        (length,) = struct.unpack(">I", await reader.readexactly(4))
        out = hs.receive(parse_message(decode_body(await reader.readexactly(length), HANDSHAKE_LIMITS),
                                       HANDSHAKE_LIMITS))
    assert hs.state is HandshakeState.DONE, hs.error
    return reader, writer


async def dropped(reader: asyncio.StreamReader, within: float = 8.0) -> bytes:
    """Read until the node closes the connection; returns what it sent (a refuse frame, pings)."""
    data = b""
    async with asyncio.timeout(within):
        while chunk := await reader.read(1 << 16):
            data += chunk
    return data


async def logged(local: LocalCluster, since: int, needle: str, within: float = 5.0) -> dict[str, Any]:
    """The first stage-1 log event after line `since` whose text contains `needle`."""
    deadline = time.monotonic() + within
    while True:
        for event in log_events(local, 1)[since:]:
            if needle in str(event):
                return event
        assert time.monotonic() < deadline, f"no log event with {needle!r}:\n{local.log_tail(1)}"
        await asyncio.sleep(0.05)


def frame(obj: Any) -> bytes:
    body = msgpack.packb(obj)
    return struct.pack(">I", len(body)) + body


def tensor_ext(t: torch.Tensor, code: int) -> msgpack.ExtType:
    dims = b"".join(struct.pack(">I", d) for d in t.shape)
    return msgpack.ExtType(1, bytes([code, t.ndim]) + dims + t.numpy().tobytes())


def ids(n: int) -> msgpack.ExtType:
    return tensor_ext(torch.arange(n, dtype=torch.int64), 7)


# (name, handshake first, bytes to send, half-close after, what the stage logs)
CASES: list[tuple[str, bool, bytes, bool, str]] = [
    ("random bytes before the handshake", False, bytes(range(7, 200)), False, "handshake_failed"),
    ("oversized length prefix before the handshake", False, struct.pack(">I", 0xFFFFFFF0), False,
     "exceeds the 8192-byte limit"),
    ("truncated frame", True, struct.pack(">I", 100) + b"\x85" * 10, True, "closed the connection"),
    ("oversized length prefix", True, struct.pack(">I", 0x7FFFFFFF) + b"\0" * 64, False, "-byte limit"),
    ("random bytes", True, b"\x00\x00\x00\x20" + bytes(range(200, 232)), False, "net.link_failed"),
    ("unknown message kind", True, frame({"t": "bogus", "req": 1}), False, "bogus"),
    ("wrong dtype segment", True, frame({"t": "segment", "req": 1, "step": 1, "after": 0, "ids": ids(2),
                                         "parents": ids(2), "pos": ids(2),
                                         "x": tensor_ext(torch.zeros(2, dtype=torch.int32), 6)}), False,
     "segment.x"),
    ("wrong shape segment", True, frame({"t": "segment", "req": 1, "step": 1, "after": 0, "ids": ids(3),
                                         "parents": ids(3), "pos": ids(2), "x": ids(3)}), False, "segment.pos"),
    ("lying length prefix", True, struct.pack(">I", 40) + msgpack.packb({"t": "close", "req": 1})
     + frame({"t": "close", "req": 2}) * 3, False, "net.link_failed"),
    ("a kind the stage does not take", True,
     frame({"t": "stats", "req": 1, "busy": [], "weights": 0, "kv": 0, "rss": 0}), False, "does not accept Stats"),
]


@pytest.mark.parametrize(("name", "handshake", "payload", "eof", "needle"), CASES, ids=[c[0] for c in CASES])
async def test_bad_client_is_dropped(stages: Stages, name: str, handshake: bool, payload: bytes, eof: bool,
                                     needle: str) -> None:
    local = stages.get(SMOL, N)
    since = len(log_events(local, 1))
    reader, writer = await raw_client(local.peers.stage(1).port, handshake)
    writer.write(payload)
    await writer.drain()
    if eof:
        writer.write_eof()
    await dropped(reader)
    writer.close()
    event = await logged(local, since, needle)
    assert event["level"] == "warning", event


async def test_stage_error_for_a_bad_request_keeps_the_link(stages: Stages) -> None:
    """Hidden states prefilled into stage 1 (which takes token ids) fail that request with an error frame; the link
    and the node stay up for the next request."""
    local = stages.get(SMOL, N)
    dep = deployment(SMOL, N)
    link = await connect("127.0.0.1", local.peers.stage(1).port, hello=dep.hello("head", 0), expect_index=1,
                         secret=None, limits=dep.limits(), timeouts=Timeouts())
    try:
        await link.send(Open(7, 64))
        await link.send(Prefill(7, 0, True, 0, torch.zeros(3, dep.config.hidden_size)))
        reply = await link.recv(timeout_s=10)
        assert isinstance(reply, Error) and reply.req == 7 and "token ids" in reply.reason, reply
        assert link.error is None
    finally:
        await link.close()


async def test_node_still_serves_after_bad_clients(head_for, smol_ref) -> None:  # type: ignore[no-untyped-def]
    async with head_for(N) as cluster:
        ids_ = cluster.encode("Name three primary colors.")
        result = await cluster.generate(ids_, Request(mode="ar", max_new_tokens=8))
    assert result.tokens == smol_ref.greedy(ids_, 8)


async def test_wrong_split_is_refused(stages: Stages) -> None:
    local = stages.get(SMOL, N)
    since = len(log_events(local, 1))
    a, b = local.peers.stage(1), local.peers.stage(2)
    peers = parse_peers(f"127.0.0.1:1\n{a.address} layers=10\n{b.address} layers=20\n")
    with pytest.raises(AuthError, match="model fingerprint mismatch") as info:
        await Cluster.connect(peers, model=SMOL)
    assert "same model and split" in str(info.value)
    await logged(local, since, "fingerprint mismatch")


@pytest.fixture(scope="module")
def secret_cluster():  # type: ignore[no-untyped-def]
    deployment(SMOL, 1)
    local = LocalCluster(SMOL, 1, secret=b"correct horse battery staple")
    try:
        start_sync(local)
        yield local
    finally:
        local.stop()


@pytest.mark.parametrize(("secret", "message"), [
    (b"wrong secret, long enough", "different shared secret"),
    (None, "uses a shared secret, but none is configured on this node"),
])
async def test_wrong_secret_is_refused(secret_cluster: LocalCluster, secret: bytes | None, message: str,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLOWSPEC_SECRET", raising=False)
    with pytest.raises(AuthError, match=message):
        await Cluster.connect(secret_cluster.peers, model=SMOL, secret=secret)
    assert "net.handshake_failed" in secret_cluster.log_tail(1)


async def test_right_secret_is_served(secret_cluster: LocalCluster) -> None:
    async with await Cluster.connect(secret_cluster.peers, model=SMOL,
                                     secret=b"correct horse battery staple") as cluster:
        result = await cluster.generate("Hi", Request(mode="ar", max_new_tokens=4))
    assert len(result.tokens) == 4
