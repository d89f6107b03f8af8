"""msgpack with tensors: ext type 1 = ``u8 dtype, u8 ndim, ndim x u32 BE dims, raw little-endian bytes``.

Pure functions, no I/O. Decoding never unpickles and never allocates before checking the caps in ``Limits``:
msgpack gets explicit per-type length caps, and the tensor hook checks dtype code, rank, element count and the
exact byte length before building the tensor. Decoded tensors are zero-copy views over the received bytes
(copied only when the payload is misaligned for its dtype or the host is big-endian): treat them as read-only.
"""

from __future__ import annotations

import struct
import sys
import warnings
from math import prod
from typing import Any

import msgpack
import torch

from flowspec.errors import LocalProtocolError, PeerProtocolError
from flowspec.net.limits import Limits

__all__ = ["DTYPE_CODES", "TENSOR_EXT", "decode_tensor", "encode_tensor", "packb", "unpackb"]

TENSOR_EXT = 1

DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float32: 1, torch.float16: 2, torch.bfloat16: 3, torch.int8: 4, torch.int16: 5,
    torch.int32: 6, torch.int64: 7, torch.uint8: 8, torch.bool: 9,
}
_CODE_DTYPES: dict[int, torch.dtype] = {code: dtype for dtype, code in DTYPE_CODES.items()}
_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_BIG_ENDIAN_HOST = sys.byteorder == "big"
# Map keys, message fields, and the nonce/mac blobs: a message never needs more.
_MAX_MAP_LEN = 32
_MAX_BIN_LEN = 64

# torch warns once per process that a tensor over immutable bytes is writable; we document read-only use.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)
    torch.frombuffer(b"\0", dtype=torch.uint8)


def encode_tensor(tensor: torch.Tensor) -> bytes:
    """The ext-1 payload of ``tensor`` (any device, any layout; sent as contiguous little-endian CPU data)."""
    code = DTYPE_CODES.get(tensor.dtype)
    if code is None:
        raise LocalProtocolError(f"dtype {tensor.dtype} has no wire code; supported: {list(DTYPE_CODES)}")
    if tensor.ndim > 255 or any(d > 0xFFFFFFFF for d in tensor.shape):
        raise LocalProtocolError(f"tensor shape {tuple(tensor.shape)} does not fit the wire header")
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    if _BIG_ENDIAN_HOST and flat.element_size() > 1:  # pragma: no cover - no big-endian CI host
        raw = flat.view(_SAME_SIZE_INT[flat.element_size()]).numpy().byteswap()
    else:
        raw = flat.view(torch.uint8).numpy()
    header = struct.pack(f">BB{tensor.ndim}I", code, tensor.ndim, *tensor.shape)
    return b"".join((header, memoryview(raw)))


def decode_tensor(data: bytes, limits: Limits) -> torch.Tensor:
    """Validate an ext-1 payload against ``limits`` and view it as a tensor. Raises PeerProtocolError."""
    if len(data) < 2:
        raise PeerProtocolError(f"tensor header truncated: {len(data)} bytes")
    code, ndim = data[0], data[1]
    dtype = _CODE_DTYPES.get(code)
    if dtype is None:
        raise PeerProtocolError(f"unknown tensor dtype code {code}")
    if ndim > limits.max_dims:
        raise PeerProtocolError(f"tensor has {ndim} dims, limit is {limits.max_dims}")
    offset = 2 + 4 * ndim
    if len(data) < offset:
        raise PeerProtocolError(f"tensor header truncated: {ndim} dims need {offset} bytes, got {len(data)}")
    dims = struct.unpack_from(f">{ndim}I", data, 2)
    count = prod(dims)
    if count > limits.max_elements:
        raise PeerProtocolError(f"tensor shape {dims} has {count} elements, limit is {limits.max_elements}")
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(data) - offset != count * itemsize:
        raise PeerProtocolError(
            f"tensor {dims} {dtype} needs {count * itemsize} payload bytes, got {len(data) - offset}")
    if count == 0:
        return torch.empty(dims, dtype=dtype)
    flat = torch.frombuffer(data, dtype=dtype, count=count, offset=offset)
    if flat.data_ptr() % itemsize:
        flat = flat.clone()  # misaligned for this dtype: copy once rather than hand out unaligned memory
    if _BIG_ENDIAN_HOST and itemsize > 1:  # pragma: no cover - no big-endian CI host
        swapped = flat.view(_SAME_SIZE_INT[itemsize]).numpy().byteswap()
        flat = torch.from_numpy(swapped).view(dtype)
    return flat.reshape(dims)


def _default(obj: object) -> msgpack.ExtType:
    if isinstance(obj, torch.Tensor):
        return msgpack.ExtType(TENSOR_EXT, encode_tensor(obj))
    raise LocalProtocolError(f"cannot put {type(obj).__name__} on the wire")


def packb(obj: object) -> bytes:
    """msgpack-encode ``obj`` (dicts, lists, str, bytes, ints, floats, bools, None, tensors)."""
    try:
        data = msgpack.packb(obj, default=_default, use_bin_type=True, strict_types=False)
    except LocalProtocolError:
        raise
    except (TypeError, ValueError, OverflowError) as exc:
        raise LocalProtocolError(f"cannot encode message: {exc}") from exc
    assert isinstance(data, bytes)
    return data


def unpackb(data: bytes, limits: Limits) -> Any:
    """Decode exactly one msgpack object with every length capped. Any malformation -> PeerProtocolError."""

    def ext_hook(code: int, payload: bytes) -> torch.Tensor:
        if code != TENSOR_EXT:
            raise PeerProtocolError(f"unknown msgpack ext type {code}")
        return decode_tensor(payload, limits)

    try:
        return msgpack.unpackb(
            data, raw=False, strict_map_key=True, use_list=True, ext_hook=ext_hook,
            max_bin_len=_MAX_BIN_LEN, max_str_len=limits.max_str_len,
            max_array_len=max(limits.max_list_len, 3), max_map_len=_MAX_MAP_LEN,
            max_ext_len=limits.max_frame_bytes,
        )
    except PeerProtocolError:
        raise
    except Exception as exc:  # msgpack raises ValueError, FormatError, StackError, ExtraData, TypeError...
        raise PeerProtocolError(f"malformed msgpack: {type(exc).__name__}: {exc}") from exc
