"""Sans-IO handshake: messages in, messages to send out, no sockets.

Both sides send ``Hello`` first. On the peer's hello each side checks version, model fingerprint and (the
connector) the role and stage index it meant to reach. Then the connector proves first: ``Auth`` carries
HMAC-SHA256 over a direction label ("the connector proves to the acceptor") and the transcript, the canonical
msgpack bytes of both hellos (connector's, then acceptor's: both nonces, roles, indices, fingerprints). The
acceptor checks it, then proves itself the same way under the other label and sends ``Ready``; the connector
checks that proof before it takes ``Ready``. Any failure produces a ``Refuse`` to send (the peer learns why)
and a local ``AuthError``.

Why this shape (docs/ARCHITECTURE.md, "Handshake"): a proof covers both fresh nonces, so it is valid on its
own connection only (a recorded handshake replays nowhere); it names its direction, so one side's proof is
never the other's; and the acceptor, which answers anyone who connects, proves nothing before the connector
has proved it knows the secret, so no connection can use a stage to sign values of its choosing and reflect
them into another (the attack a proof over "peer nonce + own hello" allowed).

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

__all__ = ["CONNECTOR_PROVES", "ACCEPTOR_PROVES", "Handshake", "HandshakeState", "LISTENING_ROLES", "proof"]

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


# Direction labels: who proves to whom. Distinct, and neither a prefix of the other.
CONNECTOR_PROVES = b"flowspec handshake v3: connector to acceptor\x00"
ACCEPTOR_PROVES = b"flowspec handshake v3: acceptor to connector\x00"


def proof(secret: bytes, label: bytes, connector: Hello, acceptor: Hello) -> bytes:
    """HMAC-SHA256(secret, label || canonical msgpack of [connector's hello, acceptor's hello])."""
    transcript = packb([connector.to_wire(), acceptor.to_wire()])
    return hmac.new(secret, label + transcript, hashlib.sha256).digest()


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
                who = _who(self.peer) if self.peer is not None else "peer"
                self.error = AuthError(f"refused by {who} ({code}): {reason}")
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
        if self._acceptor:
            return []  # the connector proves first; this side proves nothing to a peer not yet known
        return [Auth(mac=self._proof(self._secret or b"", mine=True))]

    def _proof(self, secret: bytes, *, mine: bool) -> bytes:
        """This side's proof (``mine``) or the one expected from the peer, over this connection's transcript."""
        assert self.peer is not None
        connector, acceptor = (self.peer, self.own) if self._acceptor else (self.own, self.peer)
        prover_is_acceptor = self._acceptor == mine
        return proof(secret, ACCEPTOR_PROVES if prover_is_acceptor else CONNECTOR_PROVES, connector, acceptor)

    def _on_auth(self, auth: Auth) -> list[Message]:
        if not hmac.compare_digest(auth.mac, self._proof(self._secret or b"", mine=False)):
            return self._fail("auth", *self._mac_mismatch(auth.mac))
        if self._acceptor:
            self.state = HandshakeState.DONE
            return [Auth(mac=self._proof(self._secret or b"", mine=True)), Ready()]
        self.state = HandshakeState.AWAIT_READY
        return []

    def _mac_mismatch(self, mac: bytes) -> tuple[str, str]:
        """(reason for the peer, local reason): each names the other side, as read on the node that shows it."""
        assert self.peer is not None
        me, peer = _who(self.own), _who(self.peer)
        hint = "; set the same secret on both ends"
        if self._secret is not None and hmac.compare_digest(mac, self._proof(b"", mine=False)):
            return (f"peer {me} uses a shared secret, but none is configured on this node{hint}",
                    f"peer {peer} has no shared secret configured, but this node requires one{hint}")
        if self._secret is None:
            return (f"peer {me} has no shared secret configured, but this node requires one{hint}",
                    f"peer {peer} uses a shared secret, but none is configured on this node{hint}")
        return (f"authentication failed: peer {me} has a different shared secret",
                f"authentication failed: peer {peer} proved a different shared secret")
