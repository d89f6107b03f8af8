"""Sans-IO handshake, two Handshake objects wired in memory through the real framing (a pair harness)."""

from __future__ import annotations

from collections import deque
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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
    encode_frame,
    parse_message,
)
from flowspec.net.handshake import ACCEPTOR_PROVES, CONNECTOR_PROVES, proof

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
    assert "refused by stage 2 (auth): authentication failed: peer stage 2 has a different shared secret" in client
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
    assert "refused by head 0 (index)" in server and "meant to reach stage 3" in server


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
    """A proof covers both nonces: the one recorded on another connection does not verify."""
    secret = b"shared-secret-123"
    first_c, first_s = pair(secret, secret)
    assert first_s.state is HandshakeState.DONE
    recorded = Auth(mac=proof(secret, CONNECTOR_PROVES, HEAD, STAGE))  # what the head sent on that connection
    s = Handshake(replace(STAGE, nonce=b"N" * 16), secret=secret, acceptor=True)
    s.start()
    assert s.receive(HEAD) == []
    out = s.receive(recorded)
    assert s.state is HandshakeState.FAILED and [m.kind for m in out] == ["refuse"]


def test_the_acceptor_proves_nothing_before_the_connector_has() -> None:
    """A stage answers anyone who connects: it must not sign a value the caller chose (a nonce taken from
    another connection) before the caller has proved it knows the secret."""
    s = Handshake(STAGE, secret=b"shared-secret-123", acceptor=True)
    assert [m.kind for m in s.start()] == ["hello"]
    assert s.receive(HEAD) == []
    out = s.receive(Auth(mac=bytes(32)))
    assert [m.kind for m in out] == ["refuse"] and s.state is HandshakeState.FAILED


def test_reflecting_one_stages_proof_into_another_fails() -> None:
    """The reported attack, in memory: the intruder learns stage K's nonce, asks stage K-1 to prove itself over
    that nonce while posing as the head, then replays whatever K-1 sent to K as stage K-1's proof."""
    secret = b"shared-secret-123"
    stage_k = Handshake(replace(STAGE, index=2, nonce=b"K" * 16), secret=secret, acceptor=True)
    stage_k1 = Handshake(replace(STAGE, index=1, nonce=b"J" * 16), secret=secret, acceptor=True)
    k_hello = stage_k.start()[0]
    k1_hello = stage_k1.start()[0]
    assert isinstance(k_hello, Hello) and isinstance(k1_hello, Hello)
    from_k1 = stage_k1.receive(replace(HEAD, nonce=k_hello.nonce))  # "head" carrying K's nonce
    assert from_k1 == []  # nothing to reflect
    assert stage_k.receive(k1_hello) == []
    # The best the intruder can send: a proof under any label over any transcript, without the secret.
    for guess in (proof(b"", CONNECTOR_PROVES, k1_hello, k_hello), bytes(32)):
        k = Handshake(replace(STAGE, index=2, nonce=b"L" * 16), secret=secret, acceptor=True)
        k.start()
        k.receive(k1_hello)
        assert [m.kind for m in k.receive(Auth(mac=guess))] == ["refuse"] and k.state is HandshakeState.FAILED
    # And the proof of a real connection between the head and K-1 is of no use on the K-1 -> K connection.
    c, s = pair(secret, secret, expect=1, server=k1_hello)
    assert c.state is s.state is HandshakeState.DONE
    k1_proof = proof(secret, CONNECTOR_PROVES, HEAD, k1_hello)
    out = stage_k.receive(Auth(mac=k1_proof))
    assert [m.kind for m in out] == ["refuse"] and stage_k.state is HandshakeState.FAILED


def test_a_proof_names_its_direction() -> None:
    """The same transcript gives different proofs for the two directions, so neither side's proof can be sent
    back to it as the other's."""
    secret = b"shared-secret-123"
    assert proof(secret, CONNECTOR_PROVES, HEAD, STAGE) != proof(secret, ACCEPTOR_PROVES, HEAD, STAGE)
    c = Handshake(HEAD, secret=secret, acceptor=False, expect_index=2)
    c.start()
    [sent] = c.receive(STAGE)
    assert isinstance(sent, Auth)
    assert [m.kind for m in c.receive(sent)] == ["refuse"]  # its own proof, echoed, is not the acceptor's


@settings(max_examples=60, deadline=None)
@given(a=st.binary(min_size=16, max_size=16), b=st.binary(min_size=16, max_size=16),
       c=st.binary(min_size=16, max_size=16), d=st.binary(min_size=16, max_size=16))
def test_proofs_are_bound_to_both_nonces(a: bytes, b: bytes, c: bytes, d: bytes) -> None:
    """Two connections whose nonces differ anywhere get different proofs, in both directions."""
    secret = b"shared-secret-123"
    first = (replace(HEAD, nonce=a), replace(STAGE, nonce=b))
    second = (replace(HEAD, nonce=c), replace(STAGE, nonce=d))
    for label in (CONNECTOR_PROVES, ACCEPTOR_PROVES):
        same = proof(secret, label, *first) == proof(secret, label, *second)
        assert same == ((a, b) == (c, d))


def test_empty_secret_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="secret is empty"):
        Handshake(STAGE, secret=b"", acceptor=True)
