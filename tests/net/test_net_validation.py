"""Schema validation and hostile input: every violation is a PeerProtocolError naming the field; no
allocation past the caps; arbitrary bytes split anywhere never raise anything else (hypothesis)."""

from __future__ import annotations

import struct
import tracemalloc
from typing import Any

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from net_golden import GOLDEN, LIMITS

from flowspec.errors import PeerProtocolError
from flowspec.net import FrameDecoder, Limits, encode_frame, parse_message, unpackb

H = LIMITS.hidden_size
i64 = lambda *v: torch.tensor(v, dtype=torch.int64)  # noqa: E731


def segment(**over: Any) -> dict[str, Any]:
    d: dict[str, Any] = {"t": "segment", "req": 1, "step": 0, "after": 0, "ids": i64(1, 2), "parents": i64(-1, 1),
                         "pos": i64(7, 8), "x": torch.zeros(2, H, dtype=torch.float16)}
    d.update(over)
    return {k: v for k, v in d.items() if v is not ...}


def roundtrip(d: dict[str, Any]) -> Any:
    decoder = FrameDecoder(LIMITS)
    decoder.feed(encode_frame(d))
    raw = decoder.next_message()
    assert raw is not None
    return parse_message(raw, LIMITS)


BAD: list[tuple[dict[str, Any], str]] = [
    ({"t": "launch", "req": 1}, "unknown message kind"),
    ({"req": 1}, "no string kind"),
    ({"t": 3}, "no string kind"),
    (segment(extra=1), "unexpected \\['extra'\\]"),
    (segment(step=...), "missing \\['step'\\]"),
    (segment(req="1"), "segment.req: expected int, got str"),
    (segment(req=True), "segment.req: expected int, got bool"),
    (segment(req=-1), "segment.req: -1 outside"),
    (segment(ids=torch.tensor([1.0, 2.0])), "segment.ids: expected int64"),
    (segment(ids=i64(1, 2, 3)), "segment.parents: has 2 rows, expected 3"),
    (segment(ids=i64(-5, 2)), "segment.ids: values must lie in"),
    (segment(parents=i64(-2, 1)), "segment.parents: values must lie in"),
    (segment(pos=i64(7, 1024)), "segment.pos: values must lie in"),
    (segment(pos=torch.tensor([7, 8], dtype=torch.int32)), "segment.pos: expected int64"),
    (segment(x=torch.zeros(2, H + 1)), "segment.x: expected int64 \\[2\\] tokens or"),
    (segment(x=torch.zeros(3, H)), "segment.x: expected int64 \\[2\\] tokens or"),
    (segment(x=torch.zeros(2, H, dtype=torch.int32)), "segment.x"),
    (segment(x=i64(5, 128)), "segment.x: values must lie in \\[0, 128\\)"),
    (segment(x=3), "segment.x: expected a tensor, got int"),
    (segment(ids=i64(*range(9)), parents=i64(*range(9)), pos=i64(*range(9)), x=i64(*range(9))),
     "segment.ids: has 9 rows, expected at most 8"),
    ({"t": "verdict", "req": 1, "seq": 0, "commit": i64(), "root": 1, "watermark": 1}, "verdict.seq: 0 outside"),
    ({"t": "prefill", "req": 1, "chunk": 0, "last": 1, "start": 0, "x": i64(1)}, "prefill.last: expected bool"),
    ({"t": "prefill", "req": 1, "chunk": 0, "last": True, "start": 1020, "x": i64(1, 2, 3, 4, 5)},
     "exceeds max_positions"),
    ({"t": "prefill", "req": 1, "chunk": 0, "last": True, "start": 0, "x": torch.tensor(3)}, "prefill.x: expected"),
    ({"t": "hello", "version": 1, "role": "king", "index": 0, "fingerprint": "f", "nonce": bytes(16)},
     "hello.role: 'king' is not one of"),
    ({"t": "hello", "version": 1, "role": "stage", "index": 0, "fingerprint": "f", "nonce": bytes(15)},
     "hello.nonce: expected 16 bytes"),
    ({**{"t": "hello", "version": 1, "role": "stage", "index": 1, "fingerprint": "f", "nonce": bytes(16)}, "costs": [[0, 0.1]]}, "hello.costs: entry"),
    ({**{"t": "hello", "version": 1, "role": "stage", "index": 1, "fingerprint": "f", "nonce": bytes(16)}, "costs": [[1, -0.1]]}, "hello.costs: entry"),
    ({**{"t": "hello", "version": 1, "role": "stage", "index": 1, "fingerprint": "f", "nonce": bytes(16)}, "costs": [[1, float("nan")]]}, "hello.costs: entry"),
    ({**{"t": "hello", "version": 1, "role": "stage", "index": 1, "fingerprint": "f", "nonce": bytes(16)}, "costs": [[1, "0.1"]]}, "hello.costs: entry"),
    ({**{"t": "hello", "version": 1, "role": "stage", "index": 1, "fingerprint": "f", "nonce": bytes(16)}, "costs": [[1, 0.1]] * 9}, "hello.costs: expected a list of at most 8"),
    ({**{"t": "hello", "version": 1, "role": "stage", "index": 1, "fingerprint": "f", "nonce": bytes(16)}, "cost": []}, "hello: wrong fields .*unexpected \\['cost'\\]"),
    ({"t": "auth", "mac": "00" * 16}, "auth.mac: expected 32 bytes"),
    ({"t": "stats", "req": 1, "busy": [[0.0, 1.0]], "weights": 0, "kv": 0, "rss": 0}, "stats.busy: entry"),
    ({"t": "stats", "req": 1, "busy": [[0.0, "1", 2]], "weights": 0, "kv": 0, "rss": 0}, "stats.busy: entry"),
    ({"t": "stats", "req": 1, "busy": [[0.0, 1.0, 2]] * (LIMITS.max_list_len + 1), "weights": 0, "kv": 0,
      "rss": 0}, "malformed msgpack|stats.busy"),
    ({"t": "stats", "req": 1, "busy": [], "weights": -1, "kv": 0, "rss": 0}, "stats.weights"),
    ({"t": "stats", "req": 1, "busy": []}, "stats: wrong fields"),
]


@pytest.mark.parametrize(("d", "reason"), BAD)
def test_schema_violation_names_the_field(d: dict[str, Any], reason: str) -> None:
    with pytest.raises(PeerProtocolError, match=reason):
        roundtrip(d)


def test_valid_token_and_hidden_segments_parse() -> None:
    assert roundtrip(segment()).x.shape == (2, H)
    assert roundtrip(segment(x=i64(0, 127))).x.tolist() == [0, 127]


def ext(payload: bytes) -> bytes:
    return b"\xc9" + struct.pack(">I", len(payload)) + b"\x01" + payload


def raw_frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


ATTACKS = {
    "lying length prefix": b"\xff\xff\xff\xf0" + b"\x82" * 64,
    "huge ext dims": raw_frame(b"\x81\xa1x" + ext(b"\x01\x02\xff\xff\xff\xff\xff\xff\xff\xff")),
    "ext dims overflow element count check": raw_frame(b"\x81\xa1x" + ext(b"\x07\x01\xff\xff\xff\xff")),
    "ext payload shorter than dims": raw_frame(b"\x81\xa1x" + ext(b"\x07\x01\x00\x00\x00\x02" + bytes(8))),
    "ext too many dims": raw_frame(b"\x81\xa1x" + ext(b"\x07\x03" + bytes(12))),
    "unknown dtype code": raw_frame(b"\x81\xa1x" + ext(b"\x0a\x01\x00\x00\x00\x01" + bytes(8))),
    "unknown ext type": raw_frame(b"\x81\xa1x\xd4\x05\x00"),
    "str32 claiming 4 GB": raw_frame(b"\x81\xa1x\xdb\xff\xff\xff\xff" + b"a" * 16),
    "map32 claiming 4G entries": raw_frame(b"\xdf\xff\xff\xff\xff" + b"\xa1a\x01" * 8),
    "array32 claiming 4G entries": raw_frame(b"\x81\xa1x\xdd\xff\xff\xff\xff" + b"\x01" * 8),
    "deeply nested maps": raw_frame(b"\x81\xa1x" * 3000 + b"\x01"),
    "deeply nested arrays": raw_frame(b"\x81\xa1x" + b"\x91" * 3000 + b"\x01"),
    "trailing bytes inside frame": raw_frame(b"\x81\xa1t\xa4ping\x00"),
}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_hostile_bytes_rejected_without_allocating(attack: str) -> None:
    limits = Limits.for_model(hidden_size=1536, vocab_size=151936, max_positions=32768, max_rows=64)
    decoder = FrameDecoder(limits)
    tracemalloc.start()
    try:
        with pytest.raises(PeerProtocolError):
            decoder.feed(ATTACKS[attack])
            while (raw := decoder.next_message()) is not None:
                parse_message(raw, limits)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"{attack}: peak {peak} bytes"


def test_unpackb_caps_are_explicit() -> None:
    tiny = Limits(max_frame_bytes=64, max_str_len=4)
    with pytest.raises(PeerProtocolError, match="malformed msgpack"):
        unpackb(msgpack.packb({"t": "abcdefgh"}), tiny)


KINDS = ["hello", "auth", "ready", "refuse", "open", "prefill", "segment", "verdict", "close", "ping", "pong",
         "error", "stats", "bogus"]
FIELDS = ["req", "step", "after", "ids", "parents", "pos", "x", "seq", "commit", "root", "watermark", "n", "code",
          "reason", "busy", "chunk", "last", "start", "capacity", "mac", "nonce", "version", "role", "index",
          "fingerprint"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.int64, torch.uint8, torch.bool]
tensors = st.builds(lambda dt, shape: torch.zeros(shape, dtype=dt), st.sampled_from(DTYPES),
                    st.lists(st.integers(0, 3), max_size=3).map(tuple))
scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(), st.text(max_size=8),
                    st.binary(max_size=40), tensors)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4), max_leaves=12)
wire_dicts = st.builds(lambda kind, fields: {"t": kind, **fields}, st.sampled_from(KINDS),
                       st.dictionaries(st.sampled_from(FIELDS), values, max_size=8))


def check_invariant(stream: bytes, cuts: list[int], limits: Limits) -> None:
    """Valid messages or PeerProtocolError, nothing else; never more than one frame's cap buffered."""
    decoder = FrameDecoder(limits)
    bounds = sorted({min(c, len(stream)) for c in cuts} | {0, len(stream)})
    try:
        for a, b in zip(bounds, bounds[1:]):
            decoder.feed(stream[a:b])
            while (raw := decoder.next_message()) is not None:
                parse_message(raw, limits)
            assert decoder.buffered < 4 + limits.max_frame_bytes
    except PeerProtocolError:
        pass


SLOW = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SLOW
@given(st.binary(max_size=300), st.lists(st.integers(0, 300), max_size=6))
def test_fuzz_arbitrary_bytes(data: bytes, cuts: list[int]) -> None:
    check_invariant(data, cuts, LIMITS)


@SLOW
@given(st.lists(st.sampled_from([b for _, b in GOLDEN]), min_size=1, max_size=4),
       st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 255)), max_size=4),
       st.lists(st.integers(0, 2000), max_size=6))
def test_fuzz_mutated_golden_frames(frames: list[bytes], flips: list[tuple[int, int]], cuts: list[int]) -> None:
    stream = bytearray(b"".join(frames))
    for pos, byte in flips:
        stream[pos % len(stream)] = byte
    check_invariant(bytes(stream), cuts, LIMITS)


@SLOW
@given(wire_dicts, st.lists(st.integers(0, 500), max_size=4))
def test_fuzz_structured_messages(d: dict[str, Any], cuts: list[int]) -> None:
    check_invariant(encode_frame(d), cuts, LIMITS)
