"""Frames: 4-byte big-endian length + one msgpack map. Pure: bytes in, dicts out, no sockets.

``FrameDecoder`` is incremental (feed any split of the stream) and capped: a length prefix over
``limits.max_frame_bytes`` is rejected as soon as its 4 bytes arrive, before any of the body is buffered.
After an error the decoder stays broken and says why on every later call (h11's sticky ERROR state).
"""

from __future__ import annotations

import struct
from typing import Any, final

from flowspec.errors import LocalProtocolError, PeerProtocolError
from flowspec.net.codec import packb, unpackb
from flowspec.net.limits import Limits

__all__ = ["FrameDecoder", "HEADER", "check_length", "decode_body", "encode_frame"]

HEADER = struct.Struct(">I")
# Compact the receive buffer once this many consumed bytes sit at its front (amortises the memmove).
_COMPACT_AT = 1 << 16


def encode_frame(msg: dict[str, Any]) -> bytes:
    """One frame holding ``msg``. Raises LocalProtocolError when ``msg`` cannot be encoded or framed."""
    body = packb(msg)
    if len(body) > 0xFFFFFFFF:
        raise LocalProtocolError(f"message of {len(body)} bytes does not fit a 4-byte length prefix")
    return HEADER.pack(len(body)) + body


def check_length(length: int, limits: Limits) -> None:
    """Reject a frame length before anything is read or allocated for its body."""
    if length == 0:
        raise PeerProtocolError("empty frame (length prefix 0)")
    if length > limits.max_frame_bytes:
        raise PeerProtocolError(
            f"frame of {length} bytes exceeds the {limits.max_frame_bytes}-byte limit for this link")


def decode_body(body: bytes, limits: Limits) -> dict[str, Any]:
    """msgpack-decode one frame body, which must be a map with string keys."""
    obj = unpackb(body, limits)
    if not isinstance(obj, dict):
        raise PeerProtocolError(f"frame holds a {type(obj).__name__}, expected a map")
    return obj


@final
class FrameDecoder:
    """Incremental frame decoder: ``feed(data)`` then call ``next_message()`` until it returns None."""

    __slots__ = ("_buf", "_pos", "_limits", "_error", "_need")

    def __init__(self, limits: Limits) -> None:
        self._buf = bytearray()
        self._pos = 0
        self._limits = limits
        self._error: PeerProtocolError | None = None
        self._need: int | None = None  # body length of the frame in progress, once its prefix is checked

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as messages."""
        return len(self._buf) - self._pos

    @property
    def in_frame(self) -> bool:
        """True when part of a frame has arrived and the rest has not."""
        return self._need is not None or self.buffered > 0

    def feed(self, data: bytes) -> None:
        self._raise_if_broken()
        self._buf += data

    def next_message(self) -> dict[str, Any] | None:
        """The next complete message, or None when more data is needed. Raises PeerProtocolError."""
        self._raise_if_broken()
        try:
            return self._next()
        except PeerProtocolError as exc:
            self._error = exc
            self._buf = bytearray()
            self._pos = 0
            raise

    def _next(self) -> dict[str, Any] | None:
        if self._need is None:
            if self.buffered < HEADER.size:
                return None
            (length,) = HEADER.unpack_from(self._buf, self._pos)
            check_length(length, self._limits)
            self._pos += HEADER.size
            self._need = length
        if self.buffered < self._need:
            return None
        end = self._pos + self._need
        body = bytes(self._buf[self._pos:end])
        self._pos = end
        self._need = None
        if self._pos >= _COMPACT_AT or self._pos == len(self._buf):
            del self._buf[:self._pos]
            self._pos = 0
        return decode_body(body, self._limits)

    def _raise_if_broken(self) -> None:
        if self._error is not None:
            raise PeerProtocolError(f"link already failed: {self._error.reason}", self._error.code)
