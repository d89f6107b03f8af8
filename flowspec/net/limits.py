"""Caps on what a peer may make us allocate, sized from the model config.

Every number here bounds memory before anything is allocated: the frame decoder rejects a length prefix over
``max_frame_bytes`` before buffering the body, the msgpack unpacker gets per-type caps derived from it, and the
tensor ext hook checks dims and element counts before building a tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import final

from flowspec.errors import ConfigError

__all__ = ["HANDSHAKE_LIMITS", "MAX_REQUESTS", "Limits"]

# Room for a message's non-tensor fields (kind, ids, small ints) plus msgpack and ext headers.
_OVERHEAD = 4096
# A stats report of 4096 busy intervals is a few minutes of steps at 10 ms each; longer runs report in pieces.
_DEFAULT_LIST_LEN = 4096
# Strings on the wire are kinds, codes, roles, fingerprints and human-readable reasons: never payload.
_DEFAULT_STR_LEN = 4096
# Largest msgpack encoding of one [start, end, step] triple: fixarray + 2 x float64 + uint64.
_TRIPLE_BYTES = 1 + 9 + 9 + 9
# Requests one stage serves at once, all heads together: each holds a KV cache of up to a context plus the
# tree's slack, so this bounds what peers can make a stage reserve. A head admits no more than this either.
MAX_REQUESTS = 8

# Bytes per row for ids, parents and pos (three int64).
_ROW_INDEX_BYTES = 3 * 8


@final
@dataclass(frozen=True, slots=True)
class Limits:
    """Hard caps for one link. The defaults fit the handshake only (no tensors, tiny frames)."""

    max_frame_bytes: int = 8192  # a hello/auth/refuse frame is < 1 KiB even with a long reason
    max_dims: int = 2  # the protocol carries [n] and [n, H] tensors, nothing else
    max_elements: int = 0  # no tensors during the handshake
    max_rows: int = 0  # tokens per prefill chunk / segment / verdict commit
    hidden_size: int = 0
    vocab_size: int = 0
    max_positions: int = 0  # exclusive bound on absolute positions
    max_list_len: int = 16  # longest msgpack array outside tensors (stats busy list)
    max_str_len: int = 1024  # longest msgpack str (refuse/error reasons, fingerprints)

    def __post_init__(self) -> None:
        for name in ("max_frame_bytes", "max_dims", "max_elements", "max_rows", "hidden_size",
                     "vocab_size", "max_positions", "max_list_len", "max_str_len"):
            value = getattr(self, name)
            if type(value) is not int or value < 0:
                raise ConfigError(f"Limits.{name} must be a non-negative int, got {value!r}")
        if self.max_frame_bytes < 64:
            raise ConfigError(f"Limits.max_frame_bytes={self.max_frame_bytes} cannot hold even a ping frame")

    @classmethod
    def for_model(cls, hidden_size: int, vocab_size: int, max_positions: int, *, max_rows: int = 256,
                  max_list_len: int = _DEFAULT_LIST_LEN) -> Limits:
        """Limits for a running link: the largest legitimate message is max_rows x hidden_size f32 rows.

        ``max_rows`` bounds tokens per segment and per prefill chunk (and verdict commits); the node must
        chunk prefill to it. f32 is the widest dtype the protocol carries for hidden states.
        """
        if hidden_size <= 0 or vocab_size <= 0 or max_positions <= 0 or max_rows <= 0:
            raise ConfigError(
                f"Limits.for_model needs positive sizes, got hidden_size={hidden_size}, "
                f"vocab_size={vocab_size}, max_positions={max_positions}, max_rows={max_rows}")
        tensor_bytes = max_rows * (hidden_size * 4 + _ROW_INDEX_BYTES)
        stats_bytes = max_list_len * _TRIPLE_BYTES
        return cls(
            max_frame_bytes=max(tensor_bytes, stats_bytes) + _OVERHEAD,
            max_dims=2,
            max_elements=max_rows * hidden_size,
            max_rows=max_rows,
            hidden_size=hidden_size,
            vocab_size=vocab_size,
            max_positions=max_positions,
            max_list_len=max_list_len,
            max_str_len=_DEFAULT_STR_LEN,
        )


HANDSHAKE_LIMITS = Limits()
