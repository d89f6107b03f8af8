"""Sans-IO handshake: messages in, messages to send out, no sockets.

Both sides send ``Hello`` first. On the peer's hello each side checks version, model fingerprint and (the
connector) the role and stage index it meant to reach, then sends ``Auth``: HMAC-SHA256 over the peer's nonce
followed by the canonical msgpack bytes of its own hello. The acceptor sends ``Ready`` once the connector's MAC
checks out. Any failure produces a ``Refuse`` to send (the peer learns why) and a local ``AuthError``.

Auth is always sent; without a configured secret the MAC is keyed with the empty key. That carries no security,
but it lets each side tell "the peer has no secret" and "the peer has a different secret" apart, and fail both
ends during the handshake instead of one end only after it already considered the link up.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
from typing import final

from flowspec.errors import AuthError, ConfigError, LocalProtocolError
from flowspec.net.codec import packb
from flowspec.net.messages import Auth, Hello, Message, Ready, Refuse

__all__ = ["Handshake", "HandshakeState", "LISTENING_ROLES", "compute_mac"]

LISTENING_ROLES = ("stage", "relay")  # the head only connects out (docs/ARCHITECTURE.md, Connections)
_SPLIT_HINT = "start every node with the same model and split (layers=), in the same formats (dtype/quant)"
# A pipeline fingerprint is `/`-joined fields in this order (flowspec.node.build.deployment makes it); the
# formats field is absent for an all-float32 pipeline.
_FINGERPRINT_FIELDS = ("model hash", "layer split", "number formats (head,stage1,..)")
_FP32_FORMATS = "float32 everywhere"


def fingerprint_difference(first: str, second: str) -> str:
    """Which fields of two pipeline fingerprints differ, each as `name first vs second`."""
    a, b = first.split("/"), second.split("/")
    if len(a) > len(_FINGERPRINT_FIELDS) or len(b) > len(_FINGERPRINT_FIELDS):
        return f"fingerprint {first} vs {second}"
    default = ["", "", _FP32_FORMATS]
    a += default[len(a):]
    b += default[len(b):]
    parts = [f"{name} {x} vs {y}" for name, x, y in zip(_FINGERPRINT_FIELDS, a, b) if x != y]
    return "; ".join(parts) or f"fingerprint {first} vs {second}"


class HandshakeState(enum.Enum):
    AWAIT_HELLO = "await-hello"
    AWAIT_AUTH = "await-auth"
    AWAIT_READY = "await-ready"
    DONE = "done"
    FAILED = "failed"


def compute_mac(secret: bytes, peer_nonce: bytes, own: Hello) -> bytes:
    """HMAC-SHA256(secret, peer nonce || canonical msgpack bytes of our own hello)."""
    return hmac.new(secret, peer_nonce + packb(own.to_wire()), hashlib.sha256).digest()


def _who(h: Hello) -> str:
    return f"{h.role} {h.index}"


@final
class Handshake:
    """One side of the handshake. Call ``start()`` then ``receive()`` per incoming message until done/failed."""

    __slots__ = ("own", "peer", "state", "error", "_secret", "_acceptor", "_expect_index")

    def __init__(self, own: Hello, *, secret: bytes | None, acceptor: bool, expect_index: int | None = None) -> None:
        if secret is not None and len(secret) == 0:
            raise ConfigError("the shared secret is empty; leave it unset or give at least 16 bytes")
        self.own = own
        self.peer: Hello | None = None
        self.state = HandshakeState.AWAIT_HELLO
        self.error: AuthError | None = None
        self._secret = secret
        self._acceptor = acceptor
        self._expect_index = expect_index

    def start(self) -> list[Message]:
        return [self.own]

    def receive(self, msg: Message) -> list[Message]:
        """Advance on one message; returns what to send. On failure ``state`` is FAILED and ``error`` set."""
        if self.state in (HandshakeState.DONE, HandshakeState.FAILED):
            raise LocalProtocolError(f"handshake got {msg.kind!r} after it ended ({self.state.value})")
        match msg, self.state:
            case Refuse(code=code, reason=reason), _:
                self.state = HandshakeState.FAILED
                self.error = AuthError(f"refused by peer ({code}): {reason}")
                return []
            case Hello(), HandshakeState.AWAIT_HELLO:
                return self._on_hello(msg)
            case Auth(), HandshakeState.AWAIT_AUTH:
                return self._on_auth(msg)
            case Ready(), HandshakeState.AWAIT_READY:
                self.state = HandshakeState.DONE
                return []
        return self._fail("protocol", f"unexpected {msg.kind!r} during the handshake ({self.state.value})",
                          f"peer sent {msg.kind!r} during the handshake ({self.state.value})")

    def _fail(self, code: str, to_peer: str, local: str) -> list[Message]:
        self.state = HandshakeState.FAILED
        self.error = AuthError(local)
        return [Refuse(code=code, reason=to_peer)]

    def _on_hello(self, peer: Hello) -> list[Message]:
        self.peer = peer
        own = self.own
        if peer.version != own.version:
            return self._fail(
                "version", f"protocol version mismatch: this {_who(own)} speaks v{own.version}, you speak "
                           f"v{peer.version}; upgrade flowspec so both ends match",
                f"protocol version mismatch: peer {_who(peer)} speaks v{peer.version}, this node speaks "
                f"v{own.version}; upgrade flowspec so both ends match")
        if peer.fingerprint != own.fingerprint:
            mine, theirs = own.fingerprint, peer.fingerprint
            return self._fail(
                "fingerprint", f"model fingerprint mismatch, this {_who(own)} vs you ({_who(peer)}): "
                               f"{fingerprint_difference(mine, theirs)} — {_SPLIT_HINT}",
                f"model fingerprint mismatch, peer {_who(peer)} vs this node: "
                f"{fingerprint_difference(theirs, mine)} — {_SPLIT_HINT}")
        if not self._acceptor and (peer.role not in LISTENING_ROLES or peer.index != self._expect_index):
            return self._fail(
                "index", f"wrong peer: you are {_who(peer)}, but this {_who(own)} meant to reach stage "
                         f"{self._expect_index}; check the peers file",
                f"wrong peer: expected to reach stage {self._expect_index}, reached {_who(peer)}; check the "
                f"peers file (host:port order)")
        self.state = HandshakeState.AWAIT_AUTH
        return [Auth(mac=compute_mac(self._secret or b"", peer.nonce, own))]

    def _on_auth(self, auth: Auth) -> list[Message]:
        assert self.peer is not None
        expected = compute_mac(self._secret or b"", self.own.nonce, self.peer)
        if not hmac.compare_digest(auth.mac, expected):
            return self._fail("auth", *self._mac_mismatch(auth.mac))
        if self._acceptor:
            self.state = HandshakeState.DONE
            return [Ready()]
        self.state = HandshakeState.AWAIT_READY
        return []

    def _mac_mismatch(self, mac: bytes) -> tuple[str, str]:
        assert self.peer is not None
        peer_unkeyed = hmac.compare_digest(mac, compute_mac(b"", self.own.nonce, self.peer))
        if self._secret is not None and peer_unkeyed:
            return ("this end requires a shared secret and you have none configured; set the same secret on "
                    "both ends",
                    f"peer {_who(self.peer)} has no shared secret configured, but this node requires one; set "
                    f"the same secret on both ends")
        if self._secret is None:
            return ("you authenticated with a shared secret, but this end has none configured; set the same "
                    "secret on both ends",
                    f"peer {_who(self.peer)} uses a shared secret, but none is configured on this node; set the "
                    f"same secret on both ends")
        return ("authentication failed: shared secrets differ",
                f"authentication failed: peer {_who(self.peer)} proved a different shared secret")
