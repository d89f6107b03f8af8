"""The async shell around the pure codec, framing, messages and handshake.

A ``Link`` owns one TCP connection and one ``TaskGroup`` (reader, heartbeat, and the writer of frames its
``Transport`` delays). The reader feeds ``FrameDecoder``, validates with ``parse_message``, answers pings and queues the rest
for ``recv()``. The first failure is recorded, stops the group, closes the socket, and is raised by every later
``send``/``recv`` (sticky). Foreign exceptions become flowspec errors in ``_io_errors`` and nowhere else.

``serve`` admits each connection into ``PendingHandshakes`` until its handshake is done; ``connect`` and
``serve`` take an optional ``TlsConfig`` (net/tls.py), and then the handshake runs inside mutual TLS.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass, fields, replace
from typing import Any, final

import structlog

from flowspec.bounds import seconds
from flowspec.compat import TIMEOUT_ERRORS, TaskGroup, timeout
from flowspec.errors import AuthError, ConfigError, FlowSpecError, PeerProtocolError, StageFailed, StageTimeout
from flowspec.net.framing import HEADER, FrameDecoder, check_length, decode_body, encode_frame
from flowspec.net.handshake import Handshake, HandshakeState
from flowspec.net.limits import HANDSHAKE_LIMITS, Limits
from flowspec.net.messages import Auth, Hello, Message, Ping, Pong, Ready, Refuse, parse_message
from flowspec.net.tls import TlsConfig, tls_error
from flowspec.net.transport import DIRECT, Network, Transport

__all__ = ["Link", "PendingHandshakes", "Timeouts", "connect", "install_uvloop", "serve"]

log = structlog.get_logger("flowspec.net")

_READ_CHUNK = 1 << 18  # one read() per 256 KiB: a 16-row fp16 segment at H=4096 in one or two reads
_INBOX_MAX = 64  # messages parked for recv() before the reader stops reading (TCP backpressure to the peer)
_OUTBOX_MAX = 64  # delayed frames waiting for their delivery time before send() waits
_CLOSE_GRACE = 1.0  # seconds to flush a last frame (a refuse) before the socket is dropped
_MAX_PENDING = 64  # unauthenticated connections per server; a newcomer past this drops the oldest
_TLS_RECORD = b"\x16\x03"  # a TLS handshake record (content type 22, version 3.x): what a ClientHello starts with


@final
@dataclass(frozen=True, slots=True)
class Timeouts:
    """Per-phase deadlines in seconds."""

    connect: float = 5.0  # a LAN connect takes ms; 5 s rides out one lost SYN (1 s retry) on a busy Pi
    handshake: float = 5.0  # four small frames; anything slower is a wrong port or a wedged peer
    frame: float = 30.0  # once a frame has started, its rest must arrive: 8 MiB at 10 Mbit/s is ~7 s
    heartbeat_interval: float = 1.0  # one ~10-byte ping per second is free even at 1 Mbit/s
    heartbeat_timeout: float = 5.0  # 5 missed pings: longer than a Wi-Fi spike (<= 0.25 s), short for a user
    hello: float = 1.0  # an accepted peer's TLS handshake, then its hello: a real one sends both at once

    def __post_init__(self) -> None:
        for f in fields(self):  # nan never expires and inf never ends: each is a finite number of seconds
            seconds(getattr(self, f.name), f"Timeouts.{f.name}")

    @classmethod
    def for_heartbeat(cls, heartbeat_timeout: float) -> Timeouts:
        """The link deadlines for a peer declared dead after `heartbeat_timeout` seconds of silence: pings at
        least 4 times per timeout (at most once a second), so a short timeout does not fire on a healthy peer."""
        seconds(heartbeat_timeout, "heartbeat_timeout")
        return cls(heartbeat_interval=min(1.0, heartbeat_timeout / 4), heartbeat_timeout=heartbeat_timeout)


@contextlib.contextmanager
def _io_errors(what: str) -> Iterator[None]:
    """The one place where socket and timeout exceptions become flowspec errors."""
    try:
        yield
    except FlowSpecError:
        raise
    except asyncio.IncompleteReadError as exc:
        raise StageFailed(f"{what}: peer closed the connection") from exc
    except TIMEOUT_ERRORS as exc:  # before OSError: TimeoutError is an OSError
        raise StageTimeout(f"{what}: timed out") from exc
    except ssl.SSLError as exc:  # before OSError too: an SSLError is an OSError
        raise tls_error(what, exc) from exc
    except OSError as exc:
        raise StageFailed(f"{what}: {exc.strerror or exc}") from exc


def install_uvloop() -> bool:
    """Use uvloop's event loop for new loops when it is installed; return whether it is in use."""
    try:
        import uvloop
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


@final
class Link:
    """One authenticated connection. Create with ``connect`` or receive from ``serve``."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, peer: Hello,
                 limits: Limits, timeouts: Timeouts, transport: Transport | None = None, name: str = "") -> None:
        self.peer = peer
        self.name = name or _peer_name(writer)
        self.bytes_sent = 0
        self.frames_sent = 0
        self.bytes_received = 0
        self._reader, self._writer = reader, writer
        self._limits, self._timeouts = limits, timeouts
        self._decoder = FrameDecoder(limits)
        self._transport = transport or Transport()
        self._outbox: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(_OUTBOX_MAX)
        self._inbox: deque[Message] = deque()
        self._arrived = asyncio.Event()
        self._space = asyncio.Event()
        self._down = asyncio.Event()
        self._error: Exception | None = None
        self._task: asyncio.Task[None] | None = None
        self._pings = 0

    @property
    def error(self) -> Exception | None:
        """Why the link is down, or None while it is up."""
        return self._error

    @property
    def tls(self) -> str | None:
        """The TLS version the link runs (``TLSv1.3``), or None on plain TCP."""
        ssl_object = self._writer.get_extra_info("ssl_object")
        return str(ssl_object.version()) if ssl_object is not None else None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"link {self.name}")

    async def send(self, msg: Message) -> int:
        """Write ``msg`` to the peer (or queue it, when the transport delays it); return its size on the wire in
        bytes. Raises the link's error."""
        self._raise_if_down()
        frame = encode_frame(msg.to_wire())
        self.bytes_sent += len(frame)
        self.frames_sent += 1
        deliver_at = self._transport.deliver_at(msg, len(frame), asyncio.get_running_loop().time())
        if deliver_at is None:
            await self._write(frame)
        else:
            await self._outbox.put((deliver_at, frame))
        return len(frame)

    async def recv(self, timeout_s: float | None = None) -> Message:
        """The next message from the peer. StageTimeout after ``timeout_s``; the link's error once it is down."""
        while not self._inbox:
            self._raise_if_down()
            self._arrived.clear()
            with _io_errors(f"waiting for a message from {self.name}"):
                async with timeout(timeout_s):
                    await self._arrived.wait()
        self._space.set()
        return self._inbox.popleft()

    async def close(self) -> None:
        """Close the connection (idempotent). Later calls raise StageFailed('closed by this side')."""
        self._fail(StageFailed(f"link to {self.name} closed by this side"), log_it=False)
        if self._task is not None:
            await asyncio.shield(self._task)
        else:
            await _close_writer(self._writer)

    async def __aenter__(self) -> Link:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _raise_if_down(self) -> None:
        if self._error is not None:
            raise self._error

    def _fail(self, exc: Exception, *, log_it: bool = True) -> None:
        if self._error is not None:
            return
        self._error = exc
        if log_it:
            log.warning("net.link_failed", peer=self.name, error=type(exc).__name__, reason=str(exc))
        if isinstance(exc, PeerProtocolError):
            with contextlib.suppress(Exception):  # best effort: tell the peer why before closing
                self._writer.write(encode_frame(Refuse(code=exc.code, reason=str(exc)).to_wire()))
        self._down.set()
        self._arrived.set()
        self._space.set()

    async def _run(self) -> None:
        jobs: list[Callable[[], Coroutine[Any, Any, None]]] = [self._read_loop, self._heartbeat, self._write_loop]
        try:
            async with TaskGroup() as tg:
                tasks = [tg.create_task(self._guard(job)) for job in jobs]
                await self._down.wait()
                for task in tasks:
                    task.cancel()
        finally:
            self._fail(StageFailed(f"link to {self.name} stopped"), log_it=False)  # no-op unless cancelled
            await _close_writer(self._writer)

    async def _guard(self, job: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run one of the link's jobs; its failure becomes the link's error instead of escaping the group."""
        try:
            await job()
        except FlowSpecError as exc:
            self._fail(exc)
        except Exception as exc:  # a bug in flowspec: keep it visible, fail only this link
            log.exception("net.link_bug", peer=self.name)
            self._fail(exc, log_it=False)

    async def _write(self, frame: bytes) -> None:
        with _io_errors(f"sending to {self.name}"):
            async with timeout(self._timeouts.frame):
                self._writer.write(frame)
                await self._writer.drain()

    async def _write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            deliver_at, frame = await self._outbox.get()
            delay = deliver_at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            await self._write(frame)

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self._timeouts.heartbeat_interval)
            self._pings += 1
            await self.send(Ping(n=self._pings))

    async def _read_loop(self) -> None:
        loop = asyncio.get_running_loop()
        frame_started: float | None = None
        while True:
            budget, what = self._timeouts.heartbeat_timeout, "heartbeat: no data"
            if frame_started is not None and frame_started + self._timeouts.frame - loop.time() < budget:
                budget, what = frame_started + self._timeouts.frame - loop.time(), "frame not completed"
            with _io_errors(f"{what} from {self.name} within {budget:.3g} s"):
                async with timeout(max(budget, 0.0)):
                    data = await self._reader.read(_READ_CHUNK)
            if not data:
                raise StageFailed(f"{self.name} closed the connection")
            self.bytes_received += len(data)
            self._decoder.feed(data)
            while (raw := self._decoder.next_message()) is not None:
                await self._dispatch(parse_message(raw, self._limits))
            in_frame = self._decoder.in_frame
            frame_started = (frame_started or loop.time()) if in_frame else None

    async def _dispatch(self, msg: Message) -> None:
        match msg:
            case Ping(n=n):
                await self.send(Pong(n=n))
            case Pong():
                pass
            case Refuse(code=code, reason=reason):
                raise StageFailed(f"{self.name} closed the link ({code}): {reason}")
            case Hello() | Auth() | Ready():
                raise PeerProtocolError(f"unexpected {msg.kind!r} after the handshake")
            case _:
                while len(self._inbox) >= _INBOX_MAX:
                    self._space.clear()
                    await self._space.wait()
                self._inbox.append(msg)
                self._arrived.set()


def format_address(host: str, port: int) -> str:
    """`host:port`, with IPv6 hosts in brackets (`[::1]:7001`) so the port stays readable."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _peer_name(writer: asyncio.StreamWriter) -> str:
    addr = writer.get_extra_info("peername")
    return format_address(str(addr[0]), int(addr[1])) if isinstance(addr, tuple) and len(addr) >= 2 else str(addr)


def _set_nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def _close_writer(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(Exception):
        async with timeout(_CLOSE_GRACE):
            await writer.wait_closed()


async def _read_frame(reader: asyncio.StreamReader, limits: Limits) -> dict[str, Any]:
    # readexactly allocates nothing ahead: a length prefix and then silence costs 4 bytes, and the body is read
    # only after check_length has capped it (HANDSHAKE_LIMITS: 8 KiB)
    prefix = await reader.readexactly(HEADER.size)
    (length,) = HEADER.unpack(prefix)
    if length > limits.max_frame_bytes and prefix.startswith(_TLS_RECORD):
        raise PeerProtocolError("the peer speaks TLS, but this node runs without it: start every node with "
                                "--tls-cert/--tls-key/--tls-ca, or none", code="tls")
    check_length(length, limits)
    return decode_body(await reader.readexactly(length), limits)


async def _read_hello(reader: asyncio.StreamReader, name: str, within: float) -> dict[str, Any]:
    """An accepted peer's first frame, due within ``within`` seconds (``Timeouts.hello``)."""
    try:
        async with timeout(within):
            return await _read_frame(reader, HANDSHAKE_LIMITS)
    except TIMEOUT_ERRORS as exc:
        raise StageTimeout(f"handshake with {name}: no hello within {within:.3g} s of connecting") from exc


async def _handshake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, hs: Handshake,
                     timeouts: Timeouts, name: str, *, hello_within: float | None = None) -> Hello:
    """Drive ``hs`` over the socket. Reads exact frames, so no byte after ``ready`` is consumed here.

    The whole handshake gets ``timeouts.handshake``; with ``hello_within`` (the accepting side) the peer's
    first frame must come sooner. A real peer sends its hello as soon as it is connected, so a connection that
    has not is slow or hostile, and it gives its slot back long before the handshake's deadline.
    """
    try:
        with _io_errors(f"handshake with {name}"):
            async with timeout(timeouts.handshake):
                out = hs.start()
                while True:
                    for msg in out:
                        writer.write(encode_frame(msg.to_wire()))
                    await writer.drain()
                    if hs.state in (HandshakeState.DONE, HandshakeState.FAILED):
                        break
                    if hello_within is not None and hs.state is HandshakeState.AWAIT_HELLO:
                        frame = await _read_hello(reader, name, hello_within)
                    else:
                        frame = await _read_frame(reader, HANDSHAKE_LIMITS)
                    out = hs.receive(parse_message(frame, HANDSHAKE_LIMITS))
    except PeerProtocolError as exc:
        if hs.state is not HandshakeState.FAILED:
            with contextlib.suppress(Exception):
                writer.write(encode_frame(Refuse(code=exc.code, reason=str(exc)).to_wire()))
        raise
    if hs.error is not None:
        raise hs.error
    assert hs.peer is not None
    return hs.peer


async def _closed_before_hello(exc: StageFailed, host: str, port: int, stage: int, tls: TlsConfig | None,
                               ssl_object: object, within: float) -> FlowSpecError:
    """A stage that hangs up before its hello. A TLS mismatch is refused at once (an ``AuthError``, which nobody
    retries): a TLS stage meeting this plain node, or one that refused this node's certificate. Anything else
    (the stage going down, a stage shedding pending handshakes) stays a ``StageFailed``, retried."""
    name = format_address(host, port)
    if tls is None:
        if await _speaks_tls(host, port, within):
            return AuthError(f"stage {stage} at {name} runs with TLS and this node without it: give this node "
                             f"--tls-cert/--tls-key/--tls-ca too, with a certificate signed by the stage's CA")
        return StageFailed(f"{exc} before its hello")
    # TLS 1.3: this end's handshake is over before the stage has checked this node's certificate. A stage that
    # accepts it sends its session tickets at once, before anything else; one that refuses it hangs up without a
    # word (asyncio drops the alert). So no ticket before the hang-up means: certificate refused.
    session = ssl_object.session if isinstance(ssl_object, (ssl.SSLObject, ssl.SSLSocket)) else None
    if session is not None and not session.has_ticket:
        return AuthError(f"stage {stage} at {name} refused this node's TLS certificate: it is not signed by the CA "
                         f"that stage trusts (its --tls-ca); give this node a certificate signed by that CA")
    return StageFailed(f"{exc} before its hello")


async def _speaks_tls(host: str, port: int, within: float) -> bool:
    """Whether ``host:port`` answers a TLS handshake (a probe that sends no certificate and checks none)."""
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    probe.check_hostname = False
    probe.verify_mode = ssl.CERT_NONE
    try:
        async with timeout(within):
            _, writer = await asyncio.open_connection(host, port, ssl=probe)
    except OSError:  # ssl.SSLError is one: a plain peer's answer is not a TLS record
        return False
    except TIMEOUT_ERRORS:
        return False
    writer.transport.abort()
    return True


async def connect(host: str, port: int, *, hello: Hello, expect_index: int, secret: bytes | None,
                  limits: Limits, timeouts: Timeouts, network: Network = DIRECT,
                  tls: TlsConfig | None = None) -> Link:
    """Connect to the stage expected at ``expect_index``, handshake, and return a started ``Link``.

    ``hello`` is a template: its nonce is replaced by a fresh random one for this connection. ``network`` makes
    the link's transport (the default writes frames at once). With ``tls`` the connection is mutual TLS, and the
    stage must run with TLS too.
    """
    name = format_address(host, port)
    hs = Handshake(replace(hello, nonce=os.urandom(16)), secret=secret, acceptor=False, expect_index=expect_index)
    with _io_errors(f"cannot reach stage {expect_index} at {name}"):
        async with timeout(timeouts.connect):
            reader, writer = await asyncio.open_connection(host, port, ssl=tls.client if tls else None)
    ssl_object = writer.get_extra_info("ssl_object")  # None on plain TCP; gone once the writer is closed
    try:
        _set_nodelay(writer)
        peer = await _handshake(reader, writer, hs, timeouts, name)
    except BaseException as exc:
        writer.close()  # flushes a refuse we may have queued, without awaiting under cancellation
        if isinstance(exc, StageFailed) and hs.state is HandshakeState.AWAIT_HELLO:
            raise await _closed_before_hello(exc, host, port, expect_index, tls, ssl_object,
                                             timeouts.handshake) from exc
        raise
    link = Link(reader, writer, peer=peer, limits=limits, timeouts=timeouts,
                transport=network.transport(hello, peer), name=name)
    link.start()
    return link


@final
class PendingHandshakes:
    """The connections a server has accepted and not yet authenticated, oldest first, at most ``limit``.

    When it is full, a newcomer takes the place of the oldest, which is dropped. A real peer sends its hello at
    once and is through in a few round trips, while every pending connection must deliver its hello within
    ``Timeouts.hello`` and finish within ``Timeouts.handshake``: so the oldest is the one least likely to be a
    real peer. Refusing newcomers instead would let anyone who keeps ``limit`` idle connections open lock every
    real head out; this way they must open ``limit`` connections during one real handshake (milliseconds on a
    LAN) to get in its way. Memory stays bounded: ``limit`` connections, each with its stream's read buffer and
    at most one ``HANDSHAKE_LIMITS``-sized frame.
    """

    __slots__ = ("limit", "_writers")

    def __init__(self, limit: int = _MAX_PENDING) -> None:
        if limit < 1:
            raise ConfigError(f"PendingHandshakes needs room for at least one connection, got limit={limit}")
        self.limit = limit
        self._writers: dict[asyncio.StreamWriter, None] = {}  # arrival order

    def __len__(self) -> int:
        return len(self._writers)

    def __contains__(self, writer: object) -> bool:
        return writer in self._writers

    def admit(self, writer: asyncio.StreamWriter) -> asyncio.StreamWriter | None:
        """Hold a place for ``writer``; when full, returns the oldest connection, which the caller drops."""
        oldest = None
        if len(self._writers) >= self.limit:
            oldest = next(iter(self._writers))
            del self._writers[oldest]
        self._writers[writer] = None
        return oldest

    def release(self, writer: asyncio.StreamWriter) -> None:
        """``writer``'s handshake ended; a no-op for one that was dropped to make room."""
        self._writers.pop(writer, None)


async def serve(host: str, port: int, *, hello: Hello, secret: bytes | None, limits: Limits,
                timeouts: Timeouts, on_link: Callable[[Link], Awaitable[None]], network: Network = DIRECT,
                tls: TlsConfig | None = None, pending: PendingHandshakes | None = None) -> asyncio.Server:
    """Listen; handshake each connection, then run ``on_link(link)`` and close the link when it returns.

    A failed handshake or a link that fails inside ``on_link`` is logged with the peer address and the reason
    and closes that connection only. ``pending`` holds the connections in their handshake (default: at most 64,
    a newcomer past that drops the oldest).

    With ``tls``, every connection starts with a mutual TLS handshake, which asyncio runs before this code sees
    the connection: it must end within ``timeouts.hello``, and asyncio drops a failed one without a log line
    (only the connecting side learns why). It cannot run inside ``pending``, after the accept: Python 3.10 has
    no ``StreamWriter.start_tls``, and under uvloop the peer's first TLS bytes reach the plain stream before a
    handler could start TLS on it. So half-open TLS connections are bounded in time (``timeouts.hello``), not
    in number; each holds about 40 KB under uvloop (about 300 KB under asyncio's own loop) until then.
    """
    gate = pending if pending is not None else PendingHandshakes()

    async def serve_one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        name = _peer_name(writer)
        oldest = gate.admit(writer)
        if oldest is not None:
            log.warning("net.evicted", peer=_peer_name(oldest),
                        reason=f"{gate.limit} handshakes pending: dropped the oldest to make room for {name}")
            oldest.transport.abort()
        try:
            _set_nodelay(writer)
            hs = Handshake(replace(hello, nonce=os.urandom(16)), secret=secret, acceptor=True)
            peer = await _handshake(reader, writer, hs, timeouts, name, hello_within=timeouts.hello)
        except FlowSpecError as exc:
            if writer in gate:  # not one dropped to make room: that was logged then
                log.warning("net.handshake_failed", peer=name, error=type(exc).__name__, reason=str(exc))
            writer.close()
            return
        finally:
            gate.release(writer)
        link = Link(reader, writer, peer=peer, limits=limits, timeouts=timeouts,
                    transport=network.transport(hello, peer), name=name)
        link.start()
        try:
            await on_link(link)
        except FlowSpecError as exc:
            if exc is not link.error:  # the link logs its own failure once
                log.warning("net.link_closed", peer=name, error=type(exc).__name__, reason=str(exc))
        finally:
            await link.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await serve_one(reader, writer)
        except asyncio.CancelledError:
            # Server shutdown. Nobody awaits this task, and 3.11's start_server callback crashes on a cancelled
            # task (fixed in 3.12), so the cancellation ends here once the socket is dropped.
            writer.transport.abort()

    if tls is None:
        return await asyncio.start_server(handle, host, port)
    return await asyncio.start_server(handle, host, port, ssl=tls.server, ssl_handshake_timeout=timeouts.hello)
