"""Device cost profiles: what one step costs on an emulated edge device (DESIGN.md §6).

A profile gives, in seconds:

* a stage forward over k new tokens: ``t(k) = a + b·k`` up to the knee ``k1``, ``+ b2`` per token above it,
  plus ``c_ctx`` per cached token;
* the head's drafter: one tree level over n tokens, one context pass over n accepted tokens, tree build;
* the head's ``lm_head(k)`` and a per-step CPU overhead;
* the hidden size and dtype of the profiled model, which the emulated links charge per hidden-state row.

Built-ins (``jetson-7b``, ``jetson-agx-7b``, ``pi5-8b``) live in ``profiles.toml`` next to this file, with the
source of every number; ``load_profile`` also reads a user TOML file of the same shape::

    [profile.my-board]
    source = "measured 2026-05-01, forward_latency_test k=1..256"
    stage = { a = 0.05, b = 0.0003, k1 = 64, b2 = 0.001, c_ctx = 0.0 }
    draft = { level = 0.012, level_per_beam_token = 0.0, context = 0.012, tree_build = 0.003 }
    head  = { lm_head_a = 0.004, lm_head_b = 0.00005, cpu_overhead = 0.003 }
    model = { hidden_size = 4096, dtype_bytes = 2 }
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any

from flowspec.config import read_text_file
from flowspec.errors import ConfigError
from flowspec.net import Message, Prefill, Segment
from flowspec.sched.costs import CostModel, Line

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only (JetPack 6)
    import tomli as tomllib

__all__ = ["Profile", "builtin_profiles", "load_profile", "read_profiles"]

_ROW_INDEX_BYTES = 24  # ids, parents, positions: three int64 per row on the wire
_MESSAGE_OVERHEAD = 64  # msgpack map keys, tensor headers, frame length: a small constant per message


@dataclass(frozen=True)
class Profile:
    name: str
    source: str = ""
    # stage
    a: float = 0.0
    b: float = 0.0
    k1: int | None = None
    b2: float = 0.0
    c_ctx: float = 0.0
    # drafter on the head device
    draft_level: float = 0.0
    draft_level_per_token: float = 0.0
    draft_context: float = 0.0
    draft_context_per_token: float = 0.0
    tree_build: float = 0.0
    # head
    lm_head_a: float = 0.0
    lm_head_b: float = 0.0
    cpu_overhead: float = 0.0
    # the profiled model, for link charging
    hidden_size: int = 4096
    dtype_bytes: int = 2

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
                raise ConfigError(f"profile {self.name}: {f.name} must be >= 0, got {value}")
        if self.k1 is not None and self.k1 < 1:
            raise ConfigError(f"profile {self.name}: knee k1 must be >= 1, got {self.k1}")
        if self.hidden_size < 1 or self.dtype_bytes < 1:
            raise ConfigError(f"profile {self.name}: hidden_size and dtype_bytes must be >= 1")

    # -- costs, seconds --------------------------------------------------------------------------------------
    def stage_cost(self, k: int, ctx: int = 0) -> float:
        """One stage forward over `k` new tokens with `ctx` tokens already cached."""
        if self.k1 is None or k <= self.k1:
            t = self.a + self.b * k
        else:
            t = self.a + self.b * self.k1 + self.b2 * (k - self.k1)
        return t + self.c_ctx * ctx

    def draft_level_cost(self, n: int) -> float:
        """One drafter call over a tree level of `n` tokens (the beam)."""
        return self.draft_level + self.draft_level_per_token * n

    def draft_context_cost(self, n: int) -> float:
        """The drafter's pass over `n` newly accepted tokens (0 when there are none)."""
        return self.draft_context + self.draft_context_per_token * n if n > 0 else 0.0

    def lm_head_cost(self, n: int) -> float:
        """The target's lm_head over `n` rows on the head device."""
        return self.lm_head_a + self.lm_head_b * n

    def head_step_cost(self, n: int) -> float:
        """One head step: lm_head over a returned segment of `n` rows plus the per-step CPU overhead."""
        return self.lm_head_cost(n) + self.cpu_overhead

    @property
    def row_bytes(self) -> int:
        """Bytes of one hidden-state row of the profiled model on the wire."""
        return self.hidden_size * self.dtype_bytes

    def wire_bytes(self, msg: Message, frame_len: int) -> int:
        """Bytes a frame would take on the profiled device's wire: hidden-state rows as the profiled model's
        (`rows × hidden_size × dtype_bytes` + row indices + a small constant); anything else (token ids,
        verdicts, pings) at its real size."""
        x = msg.x if isinstance(msg, (Prefill, Segment)) else None
        if x is None or not x.is_floating_point() or x.dim() != 2:
            return frame_len
        return int(x.shape[0]) * (self.row_bytes + _ROW_INDEX_BYTES) + _MESSAGE_OVERHEAD

    def cost_model(self, context: int = 128) -> CostModel:
        """The profile's cost curves as the runtime measures them at start-up (undilated)."""
        return CostModel(stage=Line(self.stage_cost(0, context), self.b),
                         lm_head=Line(self.lm_head_a + self.cpu_overhead, self.lm_head_b),
                         draft=Line(self.draft_level, self.draft_level_per_token))

    def summary(self) -> str:
        knee = f", k1={self.k1}, b2={self.b2:g}" if self.k1 is not None else ""
        return (f"{self.name}: stage t(k)={self.a:g}+{self.b:g}k{knee}; draft level "
                f"{self.draft_level:g}+{self.draft_level_per_token:g}n; lm_head {self.lm_head_a:g}+"
                f"{self.lm_head_b:g}k; head overhead {self.cpu_overhead:g}; rows {self.hidden_size}x"
                f"{self.dtype_bytes} B")


_SECTIONS: dict[str, dict[str, str]] = {  # TOML table -> key -> Profile field
    "stage": {"a": "a", "b": "b", "k1": "k1", "b2": "b2", "c_ctx": "c_ctx"},
    "draft": {"level": "draft_level", "level_per_beam_token": "draft_level_per_token",
              "context": "draft_context", "context_per_token": "draft_context_per_token",
              "tree_build": "tree_build"},
    "head": {"lm_head_a": "lm_head_a", "lm_head_b": "lm_head_b", "cpu_overhead": "cpu_overhead"},
    "model": {"hidden_size": "hidden_size", "dtype_bytes": "dtype_bytes"},
}


def _profile_from(name: str, table: dict[str, Any], where: str) -> Profile:
    kwargs: dict[str, Any] = {"name": name, "source": str(table.get("source", where))}
    for key, value in table.items():
        if key == "source":
            continue
        if key not in _SECTIONS or not isinstance(value, dict):
            raise ConfigError(f"{where}: profile {name}: unknown entry {key!r}; expected source, "
                              f"{', '.join(_SECTIONS)}")
        for sub, v in value.items():
            if sub == "knees":  # the device-profiles.md proposal: knees = [[k1, b2]]
                if v:
                    if len(v) != 1 or len(v[0]) != 2:
                        raise ConfigError(f"{where}: profile {name}: knees must be [[k1, b2]] (one knee)")
                    kwargs["k1"], kwargs["b2"] = int(v[0][0]), float(v[0][1])
                continue
            if sub not in _SECTIONS[key]:
                raise ConfigError(f"{where}: profile {name}: unknown key {key}.{sub}; expected one of "
                                  f"{', '.join(_SECTIONS[key])}")
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                raise ConfigError(f"{where}: profile {name}: {key}.{sub} must be a number, got {v!r}")
            field = _SECTIONS[key][sub]
            kwargs[field] = int(v) if field in ("k1", "hidden_size", "dtype_bytes") else float(v)
    return Profile(**kwargs)


def read_profiles(text: str, where: str = "<profiles>") -> dict[str, Profile]:
    """Every `[profile.NAME]` table of a TOML document."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: not valid TOML: {exc}") from exc
    tables = doc.get("profile")
    if not isinstance(tables, dict) or not tables:
        raise ConfigError(f"{where}: no [profile.NAME] tables")
    return {name: _profile_from(name, table, where) for name, table in tables.items()}


def builtin_profiles() -> dict[str, Profile]:
    text = resources.files("flowspec.bench").joinpath("profiles.toml").read_text()
    return read_profiles(text, "flowspec/bench/profiles.toml")


def load_profile(name_or_path: str | os.PathLike[str]) -> Profile:
    """A built-in profile by name, or a user TOML file (`file.toml` with one profile, or `file.toml:NAME`)."""
    spec = str(name_or_path)
    builtins = builtin_profiles()
    if spec in builtins:
        return builtins[spec]
    path, _, name = spec.partition(":") if not Path(spec).exists() else (spec, "", "")
    if not Path(path).is_file():
        raise ConfigError(f"unknown device profile {spec!r}: use one of {', '.join(sorted(builtins))} or a "
                          "TOML file (see flowspec/bench/profiles.toml for the format)")
    found = read_profiles(read_text_file(path, "profile file"), path)
    if name:
        if name not in found:
            raise ConfigError(f"{path} has no profile {name!r} (it has {', '.join(sorted(found))})")
        return found[name]
    if len(found) > 1:
        raise ConfigError(f"{path} holds {len(found)} profiles ({', '.join(sorted(found))}): pick one with "
                          f"{path}:NAME")
    return next(iter(found.values()))
