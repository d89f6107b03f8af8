"""Encoder and decoder against one golden table; whole, byte-at-a-time, trailing garbage; sticky errors."""

from __future__ import annotations

import sys

import pytest
import torch
from net_golden import GOLDEN, LIMITS, same_message

from flowspec.errors import PeerProtocolError
from flowspec.net import FrameDecoder, Limits, Message, decode_tensor, encode_frame, encode_tensor, parse_message

ALL_BYTES = b"".join(b for _, b in GOLDEN)


def decode_all(decoder: FrameDecoder, chunks: list[bytes]) -> list[Message]:
    out = []
    for chunk in chunks:
        decoder.feed(chunk)
        while (raw := decoder.next_message()) is not None:
            out.append(parse_message(raw, LIMITS))
    return out


@pytest.mark.parametrize(("msg", "wire"), GOLDEN, ids=[f"{m.kind}-{i}" for i, (m, _) in enumerate(GOLDEN)])
def test_encoder_matches_golden(msg: Message, wire: bytes) -> None:
    assert encode_frame(msg.to_wire()) == wire


@pytest.mark.parametrize(("msg", "wire"), GOLDEN, ids=[f"{m.kind}-{i}" for i, (m, _) in enumerate(GOLDEN)])
def test_decoder_matches_golden(msg: Message, wire: bytes) -> None:
    [got] = decode_all(FrameDecoder(LIMITS), [wire])
    assert same_message(got, msg)


def test_decoder_whole_stream() -> None:
    got = decode_all(FrameDecoder(LIMITS), [ALL_BYTES])
    assert len(got) == len(GOLDEN)
    assert all(same_message(a, m) for a, (m, _) in zip(got, GOLDEN))


def test_decoder_one_byte_at_a_time() -> None:
    decoder = FrameDecoder(LIMITS)
    got = decode_all(decoder, [ALL_BYTES[i:i + 1] for i in range(len(ALL_BYTES))])
    assert len(got) == len(GOLDEN)
    assert all(same_message(a, m) for a, (m, _) in zip(got, GOLDEN))
    assert decoder.buffered == 0 and not decoder.in_frame


def test_trailing_incomplete_frame_waits() -> None:
    decoder = FrameDecoder(LIMITS)
    got = decode_all(decoder, [ALL_BYTES + b"\x00\x00\x00\x09\x82"])
    assert len(got) == len(GOLDEN)
    assert decoder.in_frame and decoder.next_message() is None


@pytest.mark.parametrize("garbage", [
    b"\xff\xff\xff\xff",  # oversized length prefix
    b"\x00\x00\x00\x00",  # empty frame
    b"\x00\x00\x00\x01\xc1",  # 0xc1 is never used in msgpack
    b"\x00\x00\x00\x01\x01",  # a frame holding an int, not a map
    b"\x00\x00\x00\x03\x81\x01\x02",  # integer map key (strict_map_key)
    b"\x00\x00\x00\x02\x82\xa1",  # truncated map inside a complete frame
])
def test_trailing_garbage_raises_after_valid_frames(garbage: bytes) -> None:
    decoder = FrameDecoder(LIMITS)
    decoder.feed(ALL_BYTES + garbage)
    got = [decoder.next_message() for _ in GOLDEN]
    assert all(d is not None for d in got)
    with pytest.raises(PeerProtocolError):
        decoder.next_message()
    with pytest.raises(PeerProtocolError, match="already failed"):  # sticky
        decoder.next_message()
    with pytest.raises(PeerProtocolError, match="already failed"):
        decoder.feed(b"\x00")


def test_length_prefix_over_cap_rejected_before_body() -> None:
    decoder = FrameDecoder(Limits(max_frame_bytes=100))
    decoder.feed((101).to_bytes(4, "big"))  # nothing of the body has arrived yet
    with pytest.raises(PeerProtocolError, match="exceeds the 100-byte limit"):
        decoder.next_message()


def test_frame_at_cap_accepted() -> None:
    limits = Limits(max_frame_bytes=100)
    body = encode_frame({"t": "refuse", "code": "c", "reason": "r" * 60})[4:]
    pad = 100 - len(body)
    frame = encode_frame({"t": "refuse", "code": "c", "reason": "r" * (60 + pad)})
    assert len(frame) == 104
    decoder = FrameDecoder(limits)
    decoder.feed(frame)
    assert decoder.next_message() is not None


def test_decode_tensor_views_the_payload_and_copies_only_when_misaligned() -> None:
    limits = Limits(max_frame_bytes=4096, max_elements=64)
    u8 = encode_tensor(torch.arange(4, dtype=torch.uint8))
    t = decode_tensor(u8, limits)
    start_of_bytes = id(u8) + sys.getsizeof(u8) - len(u8) - 1  # CPython bytes layout
    assert t.data_ptr() == start_of_bytes + 6  # u8 needs no alignment: a view, no copy
    i64 = encode_tensor(torch.arange(3, dtype=torch.int64))  # 6-byte header: misaligned for int64
    v = decode_tensor(i64, limits)
    assert v.data_ptr() % 8 == 0 and v.tolist() == [0, 1, 2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.int16,
                                   torch.int32, torch.int64, torch.uint8, torch.bool])
@pytest.mark.parametrize("shape", [(), (0,), (3,), (2, 3), (0, 5), (4, 0)])
def test_tensor_roundtrip_every_dtype_and_shape(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    t = (torch.arange(max(1, torch.Size(shape).numel())) % 2).to(dtype)[: torch.Size(shape).numel()].reshape(shape)
    decoder = FrameDecoder(Limits(max_frame_bytes=4096, max_elements=64))
    decoder.feed(encode_frame({"t": "x", "x": t}))
    raw = decoder.next_message()
    assert raw is not None
    got = raw["x"]
    assert got.dtype == dtype and got.shape == t.shape and torch.equal(got, t)


def test_noncontiguous_tensor_encodes_its_values() -> None:
    t = torch.arange(6, dtype=torch.int64).reshape(2, 3).t()
    decoder = FrameDecoder(Limits(max_frame_bytes=4096, max_elements=64))
    decoder.feed(encode_frame({"t": "x", "x": t}))
    raw = decoder.next_message()
    assert raw is not None and torch.equal(raw["x"], t)
