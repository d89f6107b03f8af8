"""The golden table: one list of (message, exact frame bytes), used by the encoder and the decoder tests.

The bytes are spelled out by hand from the msgpack spec, so they pin the wire format across versions: if an
encoder change moves a byte, these tests fail.
"""

from __future__ import annotations

import struct
from typing import Any

import torch

from flowspec.net import (
    Auth,
    Close,
    Error,
    Hello,
    Limits,
    Message,
    Open,
    Ping,
    Pong,
    Prefill,
    Ready,
    Refuse,
    Segment,
    Stats,
    Verdict,
)

LIMITS = Limits.for_model(hidden_size=2, vocab_size=128, max_positions=1024, max_rows=8)


def s(text: str) -> bytes:
    """msgpack fixstr."""
    assert len(text) < 32
    return bytes([0xA0 | len(text)]) + text.encode()


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def i64_ext(*values: int) -> bytes:
    payload = bytes([7, 1]) + struct.pack(">I", len(values)) + struct.pack(f"<{len(values)}q", *values)
    return bytes([0xC7, len(payload), 1]) + payload


i64 = lambda *v: torch.tensor(v, dtype=torch.int64)  # noqa: E731

GOLDEN: list[tuple[Message, bytes]] = [
    (Ping(n=1), frame(b"\x82" + s("t") + s("ping") + s("n") + b"\x01")),
    (Pong(n=300), frame(b"\x82" + s("t") + s("pong") + s("n") + b"\xcd\x01\x2c")),
    (Ready(), frame(b"\x81" + s("t") + s("ready"))),
    (Refuse(code="auth", reason="no"), frame(b"\x83" + s("t") + s("refuse") + s("code") + s("auth")
                                             + s("reason") + s("no"))),
    (Auth(mac=bytes(32)), frame(b"\x82" + s("t") + s("auth") + s("mac") + b"\xc4\x20" + bytes(32))),
    (Hello(version=1, role="stage", index=2, fingerprint="ab", nonce=bytes(range(16))),
     frame(b"\x86" + s("t") + s("hello") + s("version") + b"\x01" + s("role") + s("stage") + s("index") + b"\x02"
           + s("fingerprint") + s("ab") + s("nonce") + b"\xc4\x10" + bytes(range(16)))),
    (Open(req=5, capacity=4096), frame(b"\x83" + s("t") + s("open") + s("req") + b"\x05" + s("capacity")
                                       + b"\xcd\x10\x00")),
    (Close(req=5), frame(b"\x82" + s("t") + s("close") + s("req") + b"\x05")),
    (Error(req=5, code="oom", reason="x"), frame(b"\x84" + s("t") + s("error") + s("req") + b"\x05" + s("code")
                                                 + s("oom") + s("reason") + s("x"))),
    (Verdict(req=1, seq=2, commit=i64(3, 4), root=4, watermark=5),
     frame(b"\x86" + s("t") + s("verdict") + s("req") + b"\x01" + s("seq") + b"\x02" + s("commit")
           + i64_ext(3, 4) + s("root") + b"\x04" + s("watermark") + b"\x05")),
    (Verdict(req=1, seq=1, commit=i64(), root=-1, watermark=-1),
     frame(b"\x86" + s("t") + s("verdict") + s("req") + b"\x01" + s("seq") + b"\x01" + s("commit")
           + b"\xc7\x06\x01\x07\x01\x00\x00\x00\x00" + s("root") + b"\xff" + s("watermark") + b"\xff")),
    (Segment(req=7, step=3, after=1, ids=i64(10), parents=i64(-1), pos=i64(42), x=i64(99)),
     frame(b"\x88" + s("t") + s("segment") + s("req") + b"\x07" + s("step") + b"\x03" + s("after") + b"\x01"
           + s("ids") + i64_ext(10) + s("parents") + i64_ext(-1) + s("pos") + i64_ext(42) + s("x") + i64_ext(99))),
    (Segment(req=7, step=4, after=1, ids=i64(), parents=i64(), pos=i64(),
             x=torch.empty(0, 2, dtype=torch.float16)),
     frame(b"\x88" + s("t") + s("segment") + s("req") + b"\x07" + s("step") + b"\x04" + s("after") + b"\x01"
           + s("ids") + i64_ext() + s("parents") + i64_ext() + s("pos") + i64_ext() + s("x")
           + b"\xc7\x0a\x01\x02\x02\x00\x00\x00\x00\x00\x00\x00\x02")),
    (Prefill(req=1, chunk=0, last=True, start=5, x=torch.tensor([[1.0, -2.0]], dtype=torch.float16)),
     frame(b"\x86" + s("t") + s("prefill") + s("req") + b"\x01" + s("chunk") + b"\x00" + s("last") + b"\xc3"
           + s("start") + b"\x05" + s("x")
           + b"\xc7\x0e\x01\x02\x02\x00\x00\x00\x01\x00\x00\x00\x02\x00\x3c\x00\xc0")),
    (Prefill(req=1, chunk=1, last=False, start=6, x=torch.tensor([[0.5, 1.0]], dtype=torch.bfloat16)),
     frame(b"\x86" + s("t") + s("prefill") + s("req") + b"\x01" + s("chunk") + b"\x01" + s("last") + b"\xc2"
           + s("start") + b"\x06" + s("x")
           + b"\xc7\x0e\x01\x03\x02\x00\x00\x00\x01\x00\x00\x00\x02\x00\x3f\x80\x3f")),
    (Stats(req=1, busy=((0.5, 1.0, 3),), weight_bytes=7, kv_bytes=8, rss_bytes=9),
     frame(b"\x86" + s("t") + s("stats") + s("req") + b"\x01" + s("busy")
           + b"\x91\x93\xcb\x3f\xe0" + bytes(6) + b"\xcb\x3f\xf0" + bytes(6) + b"\x03"
           + s("weights") + b"\x07" + s("kv") + b"\x08" + s("rss") + b"\x09")),
]


def wire_equal(a: Any, b: Any) -> bool:
    """Deep equality of wire dicts, tensors compared by dtype, shape and values."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(wire_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(wire_equal(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and bool(a == b)


def same_message(a: Message, b: Message) -> bool:
    return type(a) is type(b) and wire_equal(a.to_wire(), b.to_wire())
