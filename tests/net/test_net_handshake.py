"""Sans-IO handshake, two Handshake objects wired in memory through the real framing (a pair harness)."""

from __future__ import annotations

from collections import deque
from dataclasses import replace

import pytest

from flowspec.errors import AuthError, ConfigError, LocalProtocolError
from flowspec.net import (
    HANDSHAKE_LIMITS,
    Auth,
    FrameDecoder,
    Handshake,
    HandshakeState,
    Hello,
    Message,
    Ping,
    Ready,
    compute_mac,
    encode_frame,
    parse_message,
)

STAGE = Hello(version=1, role="stage", index=2, fingerprint="abc123" + "0" * 58, nonce=b"S" * 16)
HEAD = Hello(version=1, role="head", index=0, fingerprint="abc123" + "0" * 58, nonce=b"H" * 16)


def over_wire(msg: Message) -> Message:
    decoder = FrameDecoder(HANDSHAKE_LIMITS)
    decoder.feed(encode_frame(msg.to_wire()))
    raw = decoder.next_message()
    assert raw is not None
    return parse_message(raw, HANDSHAKE_LIMITS)


def run_pair(client: Handshake, server: Handshake) -> None:
    """Deliver messages both ways, alternating, until neither side has anything in flight."""
    to_server: deque[Message] = deque(client.start())
    to_client: deque[Message] = deque(server.start())
    ended = (HandshakeState.DONE, HandshakeState.FAILED)
    while to_server or to_client:
        if to_server:
            msg = to_server.popleft()
            if server.state not in ended:
                to_client.extend(server.receive(over_wire(msg)))
        if to_client:
            msg = to_client.popleft()
            if client.state not in ended:
                to_server.extend(client.receive(over_wire(msg)))


def pair(client_secret: bytes | None = None, server_secret: bytes | None = None, *, expect: int = 2,
         client: Hello = HEAD, server: Hello = STAGE) -> tuple[Handshake, Handshake]:
    c = Handshake(client, secret=client_secret, acceptor=False, expect_index=expect)
    s = Handshake(server, secret=server_secret, acceptor=True)
    run_pair(c, s)
    return c, s


@pytest.mark.parametrize("secret", [None, b"correct horse battery staple"])
def test_handshake_ok(secret: bytes | None) -> None:
    c, s = pair(secret, secret)
    assert c.state is s.state is HandshakeState.DONE
    assert c.peer == STAGE and s.peer == HEAD


def test_a_stage_announces_its_measured_costs_in_its_hello() -> None:
    """The optional `costs` ride in the hello the MAC covers; a hello without them still checks out."""
    measured = replace(STAGE, costs=((1, 0.0602), (16, 0.0632)))
    c, s = pair(b"correct horse battery staple", b"correct horse battery staple", server=measured)
    assert c.state is s.state is HandshakeState.DONE
    assert c.peer is not None and c.peer.costs == ((1, 0.0602), (16, 0.0632))


def refused(c: Handshake, s: Handshake) -> tuple[str, str]:
    assert c.state is s.state is HandshakeState.FAILED
    assert isinstance(c.error, AuthError) and isinstance(s.error, AuthError)
    return str(c.error), str(s.error)


def test_wrong_secret_refused_on_both_sides() -> None:
    client, server = refused(*pair(b"secret-one-123456", b"secret-two-123456"))
    assert "authentication failed: peer stage 2 proved a different shared secret" in client
    assert "authentication failed: peer head 0 proved a different shared secret" in server


def test_client_without_secret_told_so() -> None:
    client, server = refused(*pair(None, b"server-secret-123"))
    assert "peer head 0 has no shared secret configured, but this node requires one" in server
    assert "peer stage 2 uses a shared secret, but none is configured on this node" in client


def test_server_without_secret_told_so() -> None:
    client, server = refused(*pair(b"client-secret-123", None))
    assert "peer head 0 uses a shared secret, but none is configured on this node" in server
    assert "peer stage 2 has no shared secret configured, but this node requires one" in client


def test_fingerprint_mismatch_message() -> None:
    other = replace(HEAD, fingerprint="def456" + "1" * 58)
    client, server = refused(*pair(client=other))
    assert "model fingerprint mismatch" in client and "model fingerprint mismatch" in server
    assert f"model hash {STAGE.fingerprint} vs {other.fingerprint}" in client  # the peer's, then this node's
    assert f"model hash {other.fingerprint} vs {STAGE.fingerprint}" in server
    assert "same model and split" in server


def test_fingerprint_mismatch_names_what_differs() -> None:
    stage = replace(STAGE, fingerprint="1a2b3c4d5e6f7a8b/12-8-10/float32,bfloat16-int4g64,bfloat16-int4g64,float32")
    head = replace(HEAD, fingerprint="1a2b3c4d5e6f7a8b/10-10-10")
    client, server = refused(*pair(client=head, server=stage))
    assert "layer split 12-8-10 vs 10-10-10" in client
    assert "number formats (head,stage1,..) float32,bfloat16-int4g64,bfloat16-int4g64,float32 vs float32 " \
           "everywhere" in client
    assert "model hash" not in client  # the same model: not named as a difference
    assert "layer split 10-10-10 vs 12-8-10" in server


def test_version_mismatch() -> None:
    client, server = refused(*pair(client=replace(HEAD, version=2)))
    assert "protocol version mismatch" in client and "v2" in client and "v1" in server


def test_wrong_index_refused() -> None:
    c, s = pair(expect=3)
    client, server = refused(c, s)
    assert "expected to reach stage 3, reached stage 2" in client
    assert "refused by peer (index)" in server and "meant to reach stage 3" in server


def test_connector_refuses_a_head_that_listens() -> None:
    client, _ = refused(*pair(server=replace(STAGE, role="head", index=2)))
    assert "reached head 2" in client


def test_unexpected_message_during_handshake() -> None:
    s = Handshake(STAGE, secret=None, acceptor=True)
    s.start()
    out = s.receive(Ping(n=1))
    assert s.state is HandshakeState.FAILED and out[0].kind == "refuse"
    assert "unexpected 'ping'" in out[0].to_wire()["reason"]
    with pytest.raises(LocalProtocolError, match="after it ended"):
        s.receive(Ready())


def test_replayed_auth_from_another_connection_fails() -> None:
    """A MAC is bound to the verifier's nonce: one captured on another connection does not verify."""
    secret = b"shared-secret-123"
    first_c, first_s = pair(secret, secret)
    assert first_s.state is HandshakeState.DONE
    s = Handshake(replace(STAGE, nonce=b"N" * 16), secret=secret, acceptor=True)
    s.start()
    s.receive(HEAD)
    captured = Auth(mac=compute_mac(secret, STAGE.nonce, HEAD))  # valid for the first connection only
    s.receive(captured)
    assert s.state is HandshakeState.FAILED


def test_empty_secret_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="secret is empty"):
        Handshake(STAGE, secret=b"", acceptor=True)
