"""User-space link shaping: emulate a slower network on loopback.

``LinkShape`` is pure data plus a tiny clock model (``Shaper``): each frame occupies the emulated NIC for
``bytes * 8 / bandwidth`` seconds, frames queue behind each other, and each is delivered ``latency`` after its
last bit left. Latency is pipelined: it delays every frame but does not hold back the frames behind it.
Presets follow /work/shared/device-profiles.md section 4.1.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import final

from flowspec.errors import ConfigError

__all__ = ["LinkShape", "PRESETS", "Shaper"]

_RATE_UNITS = {"bit": 1.0, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
_TIME_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6}
_TERM = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e-?[0-9]+)?)\s*([a-z]+)\s*$")


@final
@dataclass(frozen=True, slots=True)
class LinkShape:
    """One-way latency in seconds and payload bandwidth in bits per second (``inf`` = unlimited)."""

    latency_s: float
    bandwidth_bps: float

    def __post_init__(self) -> None:
        if not self.latency_s >= 0 or not self.bandwidth_bps > 0:
            raise ConfigError(f"link shape needs latency >= 0 and bandwidth > 0, got {self}")

    @classmethod
    def parse(cls, text: str) -> LinkShape:
        """``150mbit,1ms``, ``1gbit,0.2ms``, ``500kbit`` or a preset name (``gbe``, ``paper-150``, ``wifi``)."""
        key = text.strip().lower()
        if key in PRESETS:
            return PRESETS[key]
        rate: float | None = None
        latency = 0.0
        for term in key.split(","):
            m = _TERM.match(term)
            if m is None or (m.group(2) not in _RATE_UNITS and m.group(2) not in _TIME_UNITS):
                raise ConfigError(
                    f"cannot read link shape {text!r}: expected e.g. '150mbit,1ms' or one of {sorted(PRESETS)}")
            value, unit = float(m.group(1)), m.group(2)
            if unit in _RATE_UNITS:
                rate = value * _RATE_UNITS[unit]
            else:
                latency = value * _TIME_UNITS[unit]
        if rate is None:
            raise ConfigError(f"link shape {text!r} has no bandwidth (e.g. '150mbit')")
        return cls(latency_s=latency, bandwidth_bps=rate)

    def scaled(self, dilation: float) -> LinkShape:
        """The same link seen through a time dilation D: latency x D, bandwidth / D."""
        if not dilation > 0:
            raise ConfigError(f"time dilation must be > 0, got {dilation}")
        return LinkShape(latency_s=self.latency_s * dilation, bandwidth_bps=self.bandwidth_bps / dilation)

    def serialization_s(self, nbytes: int) -> float:
        return nbytes * 8 / self.bandwidth_bps


PRESETS: dict[str, LinkShape] = {
    "gbe": LinkShape(latency_s=0.1e-3, bandwidth_bps=940e6),
    "wifi": LinkShape(latency_s=2e-3, bandwidth_bps=200e6),
    **{f"paper-{r}": LinkShape(latency_s=0.1e-3, bandwidth_bps=r * 1e6) for r in (125, 150, 250, 500, 1000)},
}


@final
class Shaper:
    """The emulated NIC's clock: when does a frame of ``nbytes`` queued at ``now`` reach the peer."""

    __slots__ = ("shape", "_busy_until")

    def __init__(self, shape: LinkShape) -> None:
        self.shape = shape
        self._busy_until = 0.0

    def deliver_at(self, now: float, nbytes: int) -> float:
        """Reserve the NIC for this frame (after any frames ahead of it); return its arrival time."""
        sent = max(now, self._busy_until) + self.shape.serialization_s(nbytes)
        self._busy_until = sent
        return sent + self.shape.latency_s
