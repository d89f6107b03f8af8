"""The handshake attacks, on real stage processes that share a secret: an intruder without the secret cannot
reflect one stage's proof into another, nor replay a recorded handshake. Each attempt is refused, and the
victim logs one warning line for it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
from collections.abc import Iterator
from dataclasses import replace

import pytest

from flowspec.compat import timeout
from flowspec.net import HANDSHAKE_LIMITS, Auth, Handshake, HandshakeState, Hello, Message, encode_frame, parse_message
from flowspec.net.framing import decode_body
from flowspec.node.build import deployment
from flowspec.node.local import LocalCluster
from tests.e2e.conftest import SMOL, log_events, start_sync

pytestmark = pytest.mark.slow

SECRET = b"correct horse battery staple"


@pytest.fixture(scope="module")
def cluster(monkeypatch_module: pytest.MonkeyPatch) -> Iterator[LocalCluster]:
    monkeypatch_module.setenv("FLOWSPEC_LOG", "info")
    deployment(SMOL, 2)
    local = LocalCluster(SMOL, 2, secret=SECRET)
    try:
        start_sync(local)
        yield local
    finally:
        local.stop()


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    with pytest.MonkeyPatch.context() as mp:
        yield mp


class Wire:
    """One raw connection, read and written frame by frame: what an intruder has."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.sent = bytearray()

    @classmethod
    async def open(cls, port: int) -> Wire:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def send(self, msg: Message) -> None:
        frame = encode_frame(msg.to_wire())
        self.sent += frame
        self.writer.write(frame)
        await self.writer.drain()

    async def recv(self, within: float = 5.0) -> Message | None:
        """The next message, or None when none comes within ``within`` seconds or the peer hangs up."""
        try:
            async with timeout(within):
                (length,) = struct.unpack(">I", await self.reader.readexactly(4))
                body = await self.reader.readexactly(length)
        except (TimeoutError, asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            return None
        return parse_message(decode_body(body, HANDSHAKE_LIMITS), HANDSHAKE_LIMITS)

    def close(self) -> None:
        self.writer.close()

    @property
    def name(self) -> str:
        """This end's address, as the stage logs its peer."""
        host, port = self.writer.get_extra_info("sockname")[:2]
        return f"{host}:{port}"


def warnings_since(local: LocalCluster, index: int, since: int, peer: str) -> list[dict[str, object]]:
    return [e for e in log_events(local, index)[since:]
            if e.get("level") in ("warning", "error") and e.get("peer") == peer]


async def settled_log(local: LocalCluster, index: int, since: int, peer: str) -> list[dict[str, object]]:
    """The warning lines stage ``index`` logged about connection ``peer`` after ``since``, once one is there
    (or 5 s) and nothing more follows. (Other connections, such as the start-up's probes, log their own.)"""
    for _ in range(100):
        if warnings_since(local, index, since, peer):
            await asyncio.sleep(0.3)
            break
        await asyncio.sleep(0.05)
    return warnings_since(local, index, since, peer)


async def test_a_proof_cannot_be_reflected_from_stage_k_minus_1_into_stage_k(cluster: LocalCluster) -> None:
    port_1, port_2 = cluster.peers.stage(1).port, cluster.peers.stage(2).port
    since_2 = len(log_events(cluster, 2))
    to_k = await Wire.open(port_2)  # stage K = 2: learn its nonce
    to_k1 = await Wire.open(port_1)  # stage K-1 = 1: ask it to prove itself over K's nonce
    intruder = to_k.name
    try:
        k_hello, k1_hello = await to_k.recv(), await to_k1.recv()
        assert isinstance(k_hello, Hello) and isinstance(k1_hello, Hello)
        await to_k.send(k1_hello)  # pose as stage 1 on stage 2's ring input (a hello is due within 1 s)
        await to_k1.send(Hello(k1_hello.version, "head", 0, k1_hello.fingerprint, k_hello.nonce))
        reflected = await to_k1.recv(within=1.0)
        assert reflected is None or reflected.kind == "refuse", f"stage 1 proved itself first: {reflected}"
        mac = reflected.mac if isinstance(reflected, Auth) else bytes(32)
        with contextlib.suppress(ConnectionError):  # a stage may hang up at once; what it said first counts
            await to_k.send(Auth(mac=mac))
        answer = await to_k.recv()
        assert answer is not None and answer.kind == "refuse", f"stage 2 let the intruder in: {answer}\n{cluster.log_tail(2)}"
    finally:
        to_k.close()
        to_k1.close()
    found = await settled_log(cluster, 2, since_2, intruder)
    assert len(found) == 1, found
    assert found[0]["event"] == "net.handshake_failed" and "different shared secret" in str(found[0]["reason"])
    assert not [e for e in log_events(cluster, 2)[since_2:] if e.get("event") == "link.up" and e.get("peer") == intruder]


async def test_a_recorded_handshake_does_not_replay(cluster: LocalCluster) -> None:
    port_1 = cluster.peers.stage(1).port
    head = deployment(SMOL, 2).hello("head", 0)
    recorded = await Wire.open(port_1)  # a real head's handshake (it knows the secret), recorded
    try:
        hs = Handshake(replace(head, nonce=os.urandom(16)), secret=SECRET, acceptor=False, expect_index=1)
        out = hs.start()
        while hs.state not in (HandshakeState.DONE, HandshakeState.FAILED):
            for msg in out:
                await recorded.send(msg)
            got = await recorded.recv()
            assert got is not None
            out = hs.receive(got)
        assert hs.state is HandshakeState.DONE, hs.error
    finally:
        recorded.close()
    await asyncio.sleep(0.2)
    since = len(log_events(cluster, 1))
    replay = await Wire.open(port_1)
    intruder = replay.name
    try:
        assert isinstance(await replay.recv(), Hello)
        replay.writer.write(bytes(recorded.sent))
        answers = [await replay.recv(), await replay.recv(within=1.0)]
        assert answers[0] is not None and answers[0].kind == "refuse", answers
        assert answers[1] is None  # and the connection is closed, no ready
    finally:
        replay.close()
    found = await settled_log(cluster, 1, since, intruder)
    assert len(found) == 1, found
    assert found[0]["event"] == "net.handshake_failed"
