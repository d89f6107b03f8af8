"""One frozen dataclass per wire message kind, plus ``parse_message``: dict from the wire -> validated message.

Validation is complete before a message object exists: kind, exact field set, field types, integer ranges,
tensor dtypes and shapes against ``Limits``. Every failure is a PeerProtocolError whose reason names the kind and
the field. Don't subclass these (h11 ``_events.py`` rule): ``parse_message`` dispatches on the exact kind.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, NoReturn, TypeAlias, final

import torch

from flowspec.errors import PeerProtocolError
from flowspec.net.limits import Limits

__all__ = [
    "Auth", "Close", "Error", "Hello", "Message", "Open", "Ping", "Pong", "Prefill", "ROLES", "Ready",
    "Refuse", "Segment", "Stats", "Verdict", "parse_message",
]

ROLES = ("head", "stage", "relay")
_I64_MAX = (1 << 63) - 1
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
Busy: TypeAlias = tuple[tuple[float, float, int], ...]


@final
@dataclass(frozen=True, slots=True)
class Hello:
    kind: ClassVar[str] = "hello"
    version: int
    role: str
    index: int
    fingerprint: str
    nonce: bytes
    # a stage's forward cost measured at start-up, (rows, seconds) pairs: the head picks tree budgets from them
    costs: tuple[tuple[int, float], ...] = ()

    def to_wire(self) -> dict[str, Any]:
        wire = {"t": self.kind, "version": self.version, "role": self.role, "index": self.index,
                "fingerprint": self.fingerprint, "nonce": self.nonce}
        if self.costs:  # optional on the wire: a node without measurements sends the hello it always sent
            wire["costs"] = [[rows, seconds] for rows, seconds in self.costs]
        return wire


@final
@dataclass(frozen=True, slots=True)
class Auth:
    kind: ClassVar[str] = "auth"
    mac: bytes

    def to_wire(self) -> dict[str, Any]:
        return {"t": self.kind, "mac": self.mac}


@final
@dataclass(frozen=True, slots=True)
class Ready:
    kind: ClassVar[str] = "ready"

    def to_wire(self) -> dict[str, Any]:
        return {"t": self.kind}


@final
@dataclass(frozen=True, slots=True)
class Refuse:
    kind: ClassVar[str] = "refuse"
    code: str
    reason: str

    def to_wire(self) -> dict[str, Any]:
        return {"t": self.kind, "code": self.code, "reason": self.reason}


@final
@dataclass(frozen=True, slots=True)
class Open:
    kind: ClassVar[str] = "open"
    req: int
    capacity: int

    def to_wire(self) -> dict[str, Any]:
        return {"t": self.kind, "req": self.req, "capacity": self.capacity}


@final
@dataclass(frozen=True, slots=True, eq=False)
class Prefill:
    kind: ClassVar[str] = "prefill"
    req: int
    chunk: int
    last: bool
    start: int
    x: torch.Tensor  # [n] int64 token ids (to V1) or [n, H] float hidden states

    def to_wire(self) -> dict[str, Any]:
        return {"t": self.kind, "req": self.req, "chunk": self.chunk, "last": self.last,
                "start": self.start, "x": self.x}


@final
@dataclass(frozen=True, slots=True, eq=False)
class Segment:
    kind: ClassVar[str] = "segment"
    req: int
    step: int
    after: int
    ids: torch.Tensor  # [n] int64 node ids
    parents: torch.Tensor  # [n] int64 parent node ids, -1 = the committed context
    pos: torch.Tensor  # [n] int64 absolute positions
    x: torch.Tensor  # [n] int64 token ids (to V1) or [n, H] float hidden states

    def to_wire(self) -> dict[str, Any]:
        return {"t": self.kind, "req": self.req, "step": self.step, "after": self.after, "ids": self.ids,
                "parents": self.parents, "pos": self.pos, "x": self.x}


@final
@dataclass(frozen=True, slots=True, eq=False)
class Verdict:
    kind: ClassVar[str] = "verdict"
    req: int
    seq: int
    commit: torch.Tensor  # [m] int64 node ids, in sequence order
    root: int
    watermark: int

    def to_wire(self) -> dict[str, Any]:
        return {"t": self.kind, "req": self.req, "seq": self.seq, "commit": self.commit, "root": self.root,
                "watermark": self.watermark}


@final
@dataclass(frozen=True, slots=True)
class Close:
    kind: ClassVar[str] = "close"
    req: int

    def to_wire(self) -> dict[str, Any]:
        return {"t": self.kind, "req": self.req}


@final
@dataclass(frozen=True, slots=True)
class Ping:
    kind: ClassVar[str] = "ping"
    n: int

    def to_wire(self) -> dict[str, Any]:
        return {"t": self.kind, "n": self.n}


@final
@dataclass(frozen=True, slots=True)
class Pong:
    kind: ClassVar[str] = "pong"
    n: int

    def to_wire(self) -> dict[str, Any]:
        return {"t": self.kind, "n": self.n}


@final
@dataclass(frozen=True, slots=True)
class Error:
    kind: ClassVar[str] = "error"
    req: int
    code: str
    reason: str

    def to_wire(self) -> dict[str, Any]:
        return {"t": self.kind, "req": self.req, "code": self.code, "reason": self.reason}


@final
@dataclass(frozen=True, slots=True)
class Stats:
    kind: ClassVar[str] = "stats"
    req: int
    busy: Busy  # (start, end, step) per compute interval
    weight_bytes: int = 0  # the stage's resident model weights (its device's memory)
    kv_bytes: int = 0  # this request's KV cache allocation
    rss_bytes: int = 0  # the stage process's resident set size (host memory)

    def to_wire(self) -> dict[str, Any]:
        return {"t": self.kind, "req": self.req, "busy": [list(b) for b in self.busy],
                "weights": self.weight_bytes, "kv": self.kv_bytes, "rss": self.rss_bytes}


Message: TypeAlias = (Hello | Auth | Ready | Refuse | Open | Prefill | Segment | Verdict | Close | Ping | Pong
                      | Error | Stats)


class _Fields:
    """Typed access to the fields of one incoming map; every error names the kind and field."""

    __slots__ = ("_d", "_kind", "_limits")

    def __init__(self, d: dict[str, Any], kind: str, limits: Limits, names: tuple[str, ...],
                 optional: tuple[str, ...] = ()) -> None:
        self._d, self._kind, self._limits = d, kind, limits
        expected = {"t", *names}
        if not expected <= set(d) <= expected | set(optional):
            missing, extra = sorted(expected - set(d)), sorted(set(d) - expected - set(optional))
            self._fail("", f"wrong fields (missing {missing}, unexpected {extra})")

    def _fail(self, name: str, what: str) -> NoReturn:
        field = f".{name}" if name else ""
        raise PeerProtocolError(f"bad {self._kind!r} message: {self._kind}{field}: {what}")

    def integer(self, name: str, lo: int = 0, hi: int = _I64_MAX) -> int:
        v = self._d[name]
        if type(v) is not int:
            self._fail(name, f"expected int, got {type(v).__name__}")
        if not lo <= v <= hi:
            self._fail(name, f"{v} outside [{lo}, {hi}]")
        return int(v)

    def boolean(self, name: str) -> bool:
        v = self._d[name]
        if type(v) is not bool:
            self._fail(name, f"expected bool, got {type(v).__name__}")
        return bool(v)

    def text(self, name: str, choices: tuple[str, ...] = ()) -> str:
        v = self._d[name]
        if type(v) is not str:
            self._fail(name, f"expected str, got {type(v).__name__}")
        if choices and v not in choices:
            self._fail(name, f"{v!r} is not one of {list(choices)}")
        return str(v)

    def blob(self, name: str, size: int) -> bytes:
        v = self._d[name]
        if type(v) is not bytes or len(v) != size:
            self._fail(name, f"expected {size} bytes of bin")
        return bytes(v)

    def index_vec(self, name: str, lo: int, hi: int, n: int | None = None) -> torch.Tensor:
        """An int64 [n] tensor, n <= max_rows (== n when given), values in [lo, hi)."""
        t = self._tensor(name)
        if t.dtype != torch.int64 or t.ndim != 1:
            self._fail(name, f"expected int64 [n], got {t.dtype} {list(t.shape)}")
        if t.shape[0] > self._limits.max_rows or (n is not None and t.shape[0] != n):
            want = f"{n} rows" if n is not None else f"at most {self._limits.max_rows} rows"
            self._fail(name, f"has {t.shape[0]} rows, expected {want}")
        if t.numel() and (int(t.min()) < lo or int(t.max()) >= hi):
            self._fail(name, f"values must lie in [{lo}, {hi})")
        return t

    def payload(self, name: str, n: int) -> torch.Tensor:
        """Token ids int64 [n] (< vocab_size) or hidden states float [n, hidden_size]."""
        t = self._tensor(name)
        if t.dtype == torch.int64 and t.ndim == 1:
            return self.index_vec(name, 0, self._limits.vocab_size, n)
        h = self._limits.hidden_size
        if t.dtype not in _FLOATS or tuple(t.shape) != (n, h):
            self._fail(name, f"expected int64 [{n}] tokens or f32/f16/bf16 [{n}, {h}] hidden states, "
                             f"got {t.dtype} {list(t.shape)}")
        return t

    def costs(self, name: str) -> tuple[tuple[int, float], ...]:
        """Optional [[rows, seconds], ...]: at most 8 pairs, rows in [1, 65536], finite seconds >= 0."""
        v = self._d.get(name, [])
        if type(v) is not list or len(v) > 8:
            self._fail(name, "expected a list of at most 8 [rows, seconds]")
        out = []
        for item in v:
            if (type(item) is not list or len(item) != 2 or type(item[0]) is not int
                    or not 1 <= item[0] <= 1 << 16 or type(item[1]) not in (int, float)
                    or not 0 <= item[1] < float("inf")):
                self._fail(name, f"entry {item!r} is not [rows, seconds]")
            out.append((int(item[0]), float(item[1])))
        return tuple(out)

    def busy(self, name: str) -> Busy:
        v = self._d[name]
        if type(v) is not list or len(v) > self._limits.max_list_len:
            self._fail(name, f"expected a list of at most {self._limits.max_list_len} [start, end, step]")
        out = []
        for item in v:
            if (type(item) is not list or len(item) != 3 or type(item[2]) is not int or item[2] < 0
                    or any(type(x) not in (int, float) for x in item[:2])):
                self._fail(name, f"entry {item!r} is not [start, end, step]")
            out.append((float(item[0]), float(item[1]), int(item[2])))
        return tuple(out)

    def rows(self, name: str) -> int:
        """Row count of a payload tensor before its dtype decides how to check it (bounded by max_rows)."""
        t = self._tensor(name)
        n = int(t.shape[0]) if t.ndim >= 1 else -1
        if not 0 <= n <= self._limits.max_rows:
            self._fail(name, f"expected [n] or [n, H] with n <= {self._limits.max_rows}, got {list(t.shape)}")
        return n

    def _tensor(self, name: str) -> torch.Tensor:
        v = self._d[name]
        if not isinstance(v, torch.Tensor):
            self._fail(name, f"expected a tensor, got {type(v).__name__}")
        return v


def _hello(f: _Fields) -> Hello:
    return Hello(version=f.integer("version"), role=f.text("role", ROLES), index=f.integer("index", 0, 1 << 16),
                 fingerprint=f.text("fingerprint"), nonce=f.blob("nonce", 16), costs=f.costs("costs"))


def _prefill(f: _Fields, lim: Limits) -> Prefill:
    start = f.integer("start", 0, lim.max_positions)
    x = f.payload("x", f.rows("x"))
    if start + x.shape[0] > lim.max_positions:
        raise PeerProtocolError(f"bad 'prefill' message: prefill.start: {start} + {x.shape[0]} rows "
                                f"exceeds max_positions={lim.max_positions}")
    return Prefill(req=f.integer("req"), chunk=f.integer("chunk"), last=f.boolean("last"), start=start, x=x)


def _segment(f: _Fields, lim: Limits) -> Segment:
    ids = f.index_vec("ids", 0, _I64_MAX)
    n = ids.shape[0]
    return Segment(req=f.integer("req"), step=f.integer("step"), after=f.integer("after"), ids=ids,
                   parents=f.index_vec("parents", -1, _I64_MAX, n), pos=f.index_vec("pos", 0, lim.max_positions, n),
                   x=f.payload("x", n))


def _verdict(f: _Fields) -> Verdict:
    return Verdict(req=f.integer("req"), seq=f.integer("seq", 1), commit=f.index_vec("commit", 0, _I64_MAX),
                   root=f.integer("root", -1), watermark=f.integer("watermark", -1))


_Parser = Callable[[_Fields, Limits], Message]
_OPTIONAL: dict[str, tuple[str, ...]] = {"hello": ("costs",)}  # fields a peer may leave out
_PARSERS: dict[str, tuple[tuple[str, ...], _Parser]] = {
    "hello": (("version", "role", "index", "fingerprint", "nonce"), lambda f, lim: _hello(f)),
    "auth": (("mac",), lambda f, lim: Auth(mac=f.blob("mac", 32))),
    "ready": ((), lambda f, lim: Ready()),
    "refuse": (("code", "reason"), lambda f, lim: Refuse(code=f.text("code"), reason=f.text("reason"))),
    "open": (("req", "capacity"), lambda f, lim: Open(req=f.integer("req"), capacity=f.integer("capacity"))),
    "prefill": (("req", "chunk", "last", "start", "x"), _prefill),
    "segment": (("req", "step", "after", "ids", "parents", "pos", "x"), _segment),
    "verdict": (("req", "seq", "commit", "root", "watermark"), lambda f, lim: _verdict(f)),
    "close": (("req",), lambda f, lim: Close(req=f.integer("req"))),
    "ping": (("n",), lambda f, lim: Ping(n=f.integer("n"))),
    "pong": (("n",), lambda f, lim: Pong(n=f.integer("n"))),
    "error": (("req", "code", "reason"),
              lambda f, lim: Error(req=f.integer("req"), code=f.text("code"), reason=f.text("reason"))),
    "stats": (("req", "busy", "weights", "kv", "rss"), lambda f, lim: Stats(
        req=f.integer("req"), busy=f.busy("busy"), weight_bytes=f.integer("weights"), kv_bytes=f.integer("kv"),
        rss_bytes=f.integer("rss"))),
}


def parse_message(d: dict[str, Any], limits: Limits) -> Message:
    """Validate one decoded frame and build its message. Raises PeerProtocolError naming the bad field."""
    kind = d.get("t")
    if type(kind) is not str:
        raise PeerProtocolError(f"message has no string kind 't' (got {type(kind).__name__})")
    entry = _PARSERS.get(kind)
    if entry is None:
        raise PeerProtocolError(f"unknown message kind {kind[:64]!r}")
    names, parse = entry
    return parse(_Fields(d, kind, limits, names, _OPTIONAL.get(kind, ())), limits)
