"""Hostile input against a live stage process: thousands of seeded-random bad frames (before and after a valid
handshake, as the head and as the previous stage), hostile-but-valid message sequences, a flood of
connections that never handshake, and slow ones (silent, one byte at a time, a length prefix and nothing) that
do not hold up a real handshake. The node stays up, its memory stays bounded, it logs why it dropped each
connection, and afterwards it serves a real generation with the same tokens as before."""

from __future__ import annotations

import os
import random
import socket
import struct
import time
from typing import Any

import msgpack
import pytest

from flowspec.api import Request
from flowspec.net import (
    HANDSHAKE_LIMITS,
    PROTOCOL_VERSION,
    Handshake,
    HandshakeState,
    Hello,
    encode_frame,
    parse_message,
)
from flowspec.net.framing import decode_body
from flowspec.node.build import deployment
from tests.faults.conftest import NEW, PROMPT, SMOL, Pipeline, log_events, rss_mb

pytestmark = pytest.mark.slow

TARGET = 2  # the middle stage: it takes hidden states, the largest tensors on the wire
CONNECTIONS = 500
SEED = 20260525


def recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return buf


def handshake(port: int, fingerprint: str, role: str = "head", index: int = 0) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    hs = Handshake(Hello(PROTOCOL_VERSION, role, index, fingerprint, os.urandom(16)), secret=None,
                   acceptor=False, expect_index=TARGET)
    out = hs.start()
    while True:
        for msg in out:
            s.sendall(encode_frame(msg.to_wire()))
        if hs.state in (HandshakeState.DONE, HandshakeState.FAILED):
            break
        (length,) = struct.unpack(">I", recv_exact(s, 4))
        out = hs.receive(parse_message(decode_body(recv_exact(s, length), HANDSHAKE_LIMITS), HANDSHAKE_LIMITS))
    assert hs.state is HandshakeState.DONE, hs.error
    return s


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def tensor(dtype_code: int, dims: tuple[int, ...], payload: bytes | None = None, itemsize: int = 4) -> msgpack.ExtType:
    n = 1
    for d in dims:
        n *= d
    data = payload if payload is not None else bytes(n * itemsize)
    return msgpack.ExtType(1, struct.pack(f">BB{len(dims)}I", dtype_code, len(dims), *dims) + data)


class Fuzzer:
    """Seeded-random frames for stage TARGET of SmolLM2 (hidden 576)."""

    def __init__(self, rng: random.Random, hidden: int, max_frame: int) -> None:
        self.rng, self.h, self.max_frame = rng, hidden, max_frame

    def req(self) -> int:
        # mostly fresh ids; some collide with the ids a real head uses next (1, 2, ...)
        return self.rng.randrange(1, 9) if self.rng.random() < 0.3 else self.rng.randrange(1 << 40)

    def hidden(self, n: int) -> msgpack.ExtType:
        return tensor(1, (n, self.h))

    def ids(self, n: int, lo: int = 0, hi: int = 64) -> msgpack.ExtType:
        return tensor(7, (n,), struct.pack(f"<{n}q", *(self.rng.randrange(lo, hi) for _ in range(n))), 8)

    def valid(self) -> dict[str, Any]:
        """A well-formed message with hostile content: unknown requests, wrong order, random trees."""
        r, n = self.rng, self.rng.randrange(0, 12)
        kind = r.choice(["ping", "open", "prefill", "segment", "verdict", "close", "close"])
        if kind == "ping":
            return {"t": "ping", "n": r.randrange(1 << 20)}
        if kind == "open":
            return {"t": "open", "req": self.req(), "capacity": r.randrange(1, 600)}
        if kind == "prefill":
            return {"t": "prefill", "req": self.req(), "chunk": r.randrange(4), "last": r.random() < 0.5,
                    "start": r.randrange(0, 40), "x": self.hidden(n)}
        if kind == "segment":
            return {"t": "segment", "req": self.req(), "step": r.randrange(1, 50), "after": r.randrange(0, 3),
                    "ids": self.ids(n), "parents": self.ids(n, -1, 64), "pos": self.ids(n, 0, 200),
                    "x": self.hidden(n)}
        if kind == "verdict":
            return {"t": "verdict", "req": self.req(), "seq": r.randrange(1, 4), "commit": self.ids(r.randrange(3)),
                    "root": r.randrange(-1, 64), "watermark": r.randrange(-1, 64)}
        return {"t": "close", "req": self.req()}

    def junk_value(self) -> Any:
        r = self.rng
        return r.choice([None, True, -1, 1 << 63, -(1 << 63), 3.5, "x" * r.randrange(50), b"\x00" * 70, [1, 2],
                         {"a": 1}, tensor(1, (2, 2)), tensor(7, (3,), None, 8), msgpack.ExtType(5, b"zz")])

    def bad_body(self) -> bytes:
        """One malformed frame body (or a malformed frame: see bad_frame)."""
        r = self.rng
        case = r.randrange(12)
        if case == 0:  # deep nesting
            depth = r.choice([50, 600, 5000, 100_000])
            return b"\x82\xa1t\xa4ping\xa1n" + b"\x91" * depth + b"\xc0"
        if case == 1:  # wrong type in a field
            msg = self.valid()
            field = r.choice([k for k in msg if k != "t"] or ["t"])
            msg[field] = self.junk_value()
            return msgpack.packb(msg, use_bin_type=True)
        if case == 2:  # missing or extra fields
            msg = self.valid()
            if len(msg) > 1 and r.random() < 0.5:
                msg.pop(r.choice([k for k in msg if k != "t"]))
            else:
                msg["extra"] = 1
            return msgpack.packb(msg, use_bin_type=True)
        if case == 3:  # tensors past the limits or lying about their size
            dims = r.choice([(1 << 32) - 1, 257, 300_000, 0]), r.choice([self.h, self.h + 1, 1, (1 << 32) - 1])
            ext = r.choice([
                tensor(1, dims, b"\x00" * 64),
                tensor(r.choice([0, 10, 200, 255]), (2, 2), b"\x00" * 16),
                msgpack.ExtType(1, bytes([1, 255]) + b"\x00" * 16),
                msgpack.ExtType(1, bytes([1, 3]) + struct.pack(">3I", 2, 2, 2) + b"\x00" * 32),
                msgpack.ExtType(1, b"\x01"),
                tensor(1, (4, self.h), b"\x00" * 7),
                tensor(7, (300,), None, 8),  # more rows than max_rows
                tensor(7, (4,), None, 8),  # token ids where hidden states belong
            ])
            msg = {"t": "segment", "req": 1, "step": 1, "after": 0, "ids": self.ids(4), "parents": self.ids(4, -1),
                   "pos": self.ids(4), "x": ext}
            return msgpack.packb(msg, use_bin_type=True)
        if case == 4:  # unknown kinds
            kind = r.choice(["", "PING", "stats2", "x" * 5000, "hello2", "\u2603"])
            return msgpack.packb(r.choice([{"t": kind}, {"t": 7}, {"kind": "ping"}, {}]), use_bin_type=True)
        if case == 5:  # not a map
            return msgpack.packb(r.choice([[1, 2, 3], "ping", 12, None, b"\x00" * 10]), use_bin_type=True)
        if case == 6:  # random bytes
            return os.urandom(r.randrange(1, 300))
        if case == 7:  # msgpack headers that lie: str32/bin32/array32/map32 with huge declared lengths
            return r.choice([b"\x81\xa1t\xdb\x7f\xff\xff\xff", b"\x81\xa1t\xc6\xff\xff\xff\xf0abc",
                             b"\xdd\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff\xa1t", b"\xc9\xff\xff\xff\xf0\x01"])
        if case == 8:  # handshake messages after the handshake
            return msgpack.packb(r.choice([{"t": "ready"}, {"t": "auth", "mac": bytes(32)},
                                           {"t": "hello", "version": 1, "role": "head", "index": 0,
                                            "fingerprint": "x", "nonce": bytes(16)}]), use_bin_type=True)
        if case == 9:  # non-string map keys, duplicate-ish keys
            return r.choice([b"\x81\x01\x02", b"\x82\xa1t\xa4ping\xa1t\xa4pong", b"\x81\xc0\xc0"])
        if case == 10:  # trailing bytes after a valid message
            return msgpack.packb(self.valid(), use_bin_type=True) + os.urandom(r.randrange(1, 20))
        return msgpack.packb(self.valid(), use_bin_type=True)[: r.randrange(1, 8)]  # cut inside the body

    def bad_frame(self) -> bytes:
        r = self.rng
        case = r.randrange(6)
        if case == 0:  # length prefix past the limit
            return struct.pack(">I", r.randrange(self.max_frame + 1, 1 << 32)) + os.urandom(r.randrange(100))
        if case == 1:  # zero length
            return b"\x00\x00\x00\x00"
        if case == 2:  # a frame cut short, then the connection closes
            full = frame(msgpack.packb(self.valid(), use_bin_type=True))
            return full[: r.randrange(1, len(full))]
        if case == 3:  # a length prefix promising more than is sent
            body = msgpack.packb(self.valid(), use_bin_type=True)
            return struct.pack(">I", min(len(body) + r.randrange(1, 5000), self.max_frame)) + body
        return frame(self.bad_body())


def pre_handshake_garbage(port: int, rng: random.Random) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        data = rng.choice([os.urandom(rng.randrange(1, 400)), struct.pack(">I", 1 << 31),
                           frame(msgpack.packb({"t": "hello", "version": 1, "role": "head", "index": 0,
                                                "fingerprint": "wrong", "nonce": bytes(16)})),
                           frame(msgpack.packb({"t": "ping", "n": 1})), b"\x00\x00\x20\x01" + b"\x80" * 100])
        try:
            s.sendall(data)
        except OSError:
            pass
    return 1


def one_connection(port: int, fp: str, fuzz: Fuzzer, rng: random.Random) -> int:
    """Handshake (as the head or as stage 1), some hostile-but-valid frames, then a malformed one."""
    role, index = rng.choice([("head", 0), ("head", 0), ("stage", 1)])
    s = handshake(port, fp, role, index)
    frames = [frame(msgpack.packb(fuzz.valid(), use_bin_type=True)) for _ in range(rng.randrange(0, 8))]
    frames.append(fuzz.bad_frame())
    try:
        for f in frames:
            s.sendall(f)
        if rng.random() < 0.1:
            time.sleep(0.02)  # let some requests start computing before the link drops
    except OSError:
        pass  # the node already hung up on an earlier bad frame: that is the point
    finally:
        s.close()
    return len(frames)


def flood(port: int, n: int = 200, hold_s: float = 1.5) -> None:
    socks = []
    try:
        for _ in range(n):
            try:
                socks.append(socket.create_connection(("127.0.0.1", port), timeout=5))
            except OSError:
                pass
        time.sleep(hold_s)
    finally:
        for s in socks:
            s.close()


def slow_flood(port: int, fingerprint: str, n: int = 70) -> float:
    """`n` connections of each slow kind, then a real handshake: returns how long that took (a behavioural
    bound, see tests/net/test_net_slow_clients.py). The dribblers go on for longer than Timeouts.hello."""
    hello = frame(msgpack.packb({"t": "hello", "version": PROTOCOL_VERSION, "role": "head", "index": 0,
                                 "fingerprint": fingerprint, "nonce": bytes(16)}))
    silent, prefixed, dribblers = [], [], []
    try:
        for _ in range(n):
            silent.append(socket.create_connection(("127.0.0.1", port), timeout=5))
            prefixed.append(socket.create_connection(("127.0.0.1", port), timeout=5))
            prefixed[-1].sendall(struct.pack(">I", HANDSHAKE_LIMITS.max_frame_bytes))
            dribblers.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        start = time.monotonic()
        handshake(port, fingerprint).close()
        took = time.monotonic() - start
        for i in range(8):  # one byte per 200 ms
            for s in dribblers:
                try:
                    s.send(hello[i:i + 1])
                except OSError:
                    pass  # dropped: its hello was overdue
            time.sleep(0.2)
        return took
    finally:
        for s in silent + prefixed + dribblers:
            s.close()


async def test_stage_survives_hostile_input_and_still_serves(pipe: Pipeline) -> None:
    request = Request(mode="flowspec", max_new_tokens=NEW)
    reference = await pipe.reference(request)
    dep = deployment(SMOL, 3)
    limits = dep.limits()
    port = pipe.local.peers.stage(TARGET).port
    pid = pipe.pid(TARGET)
    log_before = len(log_events(pipe.local.logs[TARGET]))
    text_before = pipe.local.logs[TARGET].read_text(errors="replace")
    rss_before = rss_mb(pid)
    rng = random.Random(SEED)
    fuzz = Fuzzer(rng, limits.hidden_size, limits.max_frame_bytes)

    start = time.monotonic()
    sent, peak = 0, rss_before
    flood(port)
    slow_handshake_s = slow_flood(port, dep.fingerprint)
    for i in range(CONNECTIONS):
        if i % 10 == 0:
            sent += pre_handshake_garbage(port, rng)
        sent += one_connection(port, dep.fingerprint, fuzz, rng)
        if i % 50 == 0:
            peak = max(peak, rss_mb(pid))
            assert pipe.local.procs[TARGET].poll() is None, pipe.local.log_tail(TARGET)
    flood(port)
    fuzz_s = time.monotonic() - start
    time.sleep(1.0)  # let the node finish dropping the last connections
    rss_after = rss_mb(pid)
    peak = max(peak, rss_after)

    assert pipe.local.procs[TARGET].poll() is None, pipe.local.log_tail(TARGET)
    assert slow_handshake_s < 1.5, f"a real handshake took {slow_handshake_s:.2f} s behind slow connections"
    assert sent >= 2000
    assert rss_after - rss_before < 100, f"RSS {rss_before:.0f} -> {rss_after:.0f} MB"
    assert peak - rss_before < 200, f"RSS peaked at {peak:.0f} MB (from {rss_before:.0f})"

    events = log_events(pipe.local.logs[TARGET])[log_before:]
    reasons = " | ".join(str(e.get("reason", "")) for e in events
                         if e.get("event") in ("net.handshake_failed", "net.link_failed", "net.link_closed",
                                               "net.evicted", "request.failed"))
    for expected in ("exceeds", "unknown message kind", "malformed msgpack", "wrong fields", "handshake",
                     "no hello within"):
        assert expected in reasons, f"no logged reason mentions {expected!r}; logged: {summary(events)}"
    bugs = [e for e in events if e.get("event") == "net.link_bug"]
    assert not bugs, bugs[:3]
    text = pipe.local.logs[TARGET].read_text(errors="replace")
    for crash in ("Traceback", "exception was never retrieved"):
        assert text.count(crash) == text_before.count(crash), text[len(text_before):][-3000:]

    cluster = await pipe.head()
    try:
        result = await cluster.generate(PROMPT, request)
    finally:
        await cluster.aclose()
    assert result.tokens == reference
    # one run of many saw the head's links time out once here (recovered, same tokens); not reproduced since
    assert result.recoveries <= 1, result
    print(f"\n[faults] fuzz: {sent} frames over {CONNECTIONS} connections + 2 floods of 200 in {fuzz_s:.1f} s; "
          f"RSS {rss_before:.0f} -> {rss_after:.0f} MB (peak {peak:.0f} MB); a handshake behind 210 slow "
          f"connections took {slow_handshake_s * 1000:.0f} ms")


def summary(events: list[dict[str, Any]]) -> str:
    counts: dict[str, int] = {}
    sample: dict[str, str] = {}
    for e in events:
        key = f"{e.get('event')}/{e.get('error', '')}"
        counts[key] = counts.get(key, 0) + 1
        sample.setdefault(key, str(e.get("reason", ""))[:160])
    return "; ".join(f"{n} x {k} (e.g. {sample[k]!r})" for k, n in sorted(counts.items(), key=lambda kv: -kv[1]))
