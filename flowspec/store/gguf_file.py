"""Check a GGUF file before converting it: a readable header, an architecture flowspec runs, a tokenizer,
and every tensor's bytes present (a truncated download otherwise fails deep inside transformers' reader).

Reads only the header and the tensor table (memory-mapped), never the tensor data: instant on any size.
"""

from __future__ import annotations

import dataclasses
import mmap
import struct
from math import prod
from pathlib import Path

from flowspec.errors import ModelError
from flowspec.model.config import SUPPORTED_ARCHS

# metadata value types (GGUF spec): fixed-size ones by format; 8 is a string, 9 an array
_FIXED = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_DEFAULT_ALIGNMENT = 32


@dataclasses.dataclass(frozen=True)
class GGUFInfo:
    architecture: str
    name: str | None
    keys: frozenset[str]  # metadata keys
    tensors: int
    needed_bytes: int  # where the last tensor's data ends: the file must be at least this long
    size: int  # the file's bytes


class _Truncated(Exception):
    pass


class _Cursor:
    def __init__(self, buf: mmap.mmap | bytes) -> None:
        self.buf, self.pos = buf, 0

    def unpack(self, fmt: str) -> tuple[int | float | bool, ...]:
        try:
            out = struct.unpack_from(fmt, self.buf, self.pos)
        except struct.error:
            raise _Truncated from None
        self.pos += struct.calcsize(fmt)
        return out

    def u32(self) -> int:
        return int(self.unpack("<I")[0])

    def u64(self) -> int:
        return int(self.unpack("<Q")[0])

    def string(self) -> str:
        n = self.u64()
        if self.pos + n > len(self.buf):
            raise _Truncated
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, kind: int) -> object:
        if kind in _FIXED:
            return self.unpack(_FIXED[kind])[0]
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            elem, count = self.u32(), self.u64()
            if elem in _FIXED:  # skip: nothing here needs the values
                self.pos += count * struct.calcsize(_FIXED[elem])
                if self.pos > len(self.buf):
                    raise _Truncated
            else:
                for _ in range(count):
                    self.value(elem)
            return count
        raise ValueError(f"unknown metadata value type {kind}")


def read_gguf_info(path: Path) -> GGUFInfo:
    """The header of a GGUF file; ModelError naming the problem when it is not one, or is cut short."""
    size = path.stat().st_size
    if size < 24:
        raise ModelError(f"{path}: {size} bytes is too short for a GGUF file (truncated or not a GGUF)")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise ModelError(f"{path}: not a GGUF file (it does not start with the GGUF magic bytes)")
        try:
            return _parse(_Cursor(buf), path, size)
        except _Truncated:
            raise ModelError(f"{path}: truncated GGUF: the file ({size:,} bytes) ends inside its header; "
                             "copy or download it again") from None
        except ValueError as e:
            raise ModelError(f"{path}: corrupt GGUF header ({e})") from None


def _parse(cur: _Cursor, path: Path, size: int) -> GGUFInfo:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    cur.pos = 4
    version, tensor_count, kv_count = cur.unpack("<IQQ")
    if version not in (2, 3):
        raise ModelError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
    meta: dict[str, object] = {}
    for _ in range(int(kv_count)):
        key = cur.string()
        meta[key] = cur.value(cur.u32())
    ends = []
    for _ in range(int(tensor_count)):
        name = cur.string()
        dims = [cur.u64() for _ in range(cur.u32())]
        kind, offset = cur.u32(), cur.u64()
        try:
            block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
        except (ValueError, KeyError):
            raise ModelError(f"{path}: tensor {name} has ggml type {kind}, which the gguf package does not know; "
                             "upgrade it (pip install -U gguf) or use another quantization of the model") from None
        ends.append(offset + prod(dims) // block * block_bytes)
    alignment = meta.get("general.alignment", _DEFAULT_ALIGNMENT)
    align = alignment if isinstance(alignment, int) and alignment > 0 else _DEFAULT_ALIGNMENT
    data_start = (cur.pos + align - 1) // align * align
    arch, model_name = meta.get("general.architecture"), meta.get("general.name")
    return GGUFInfo(str(arch) if arch is not None else "", str(model_name) if model_name is not None else None,
                    frozenset(meta), int(tensor_count), data_start + max(ends, default=0), size)


def check_gguf(path: Path) -> GGUFInfo:
    """read_gguf_info, then refuse what flowspec cannot run or transformers cannot convert, by name."""
    info = read_gguf_info(path)
    if not info.architecture:
        raise ModelError(f"{path}: the GGUF metadata has no general.architecture")
    if info.architecture not in SUPPORTED_ARCHS:
        raise ModelError(f"{path}: GGUF architecture {info.architecture!r} is not supported; "
                         f"flowspec runs {', '.join(SUPPORTED_ARCHS)}")
    if info.needed_bytes > info.size:
        raise ModelError(f"{path}: truncated GGUF: {info.size:,} bytes, but its {info.tensors} tensors need "
                         f"{info.needed_bytes:,}; copy or download it again")
    if "tokenizer.ggml.tokens" not in info.keys:
        raise ModelError(f"{path}: the GGUF has no tokenizer (tokenizer.ggml.tokens); the head needs one")
    return info


__all__ = ["GGUFInfo", "check_gguf", "read_gguf_info"]
