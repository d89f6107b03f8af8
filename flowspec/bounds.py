"""Numeric settings, checked once: durations, counts and ports are finite, in range, and refused by name.

The command line (flowspec/cli/options.py: its argparse types) and the library (`Timeouts`, `Cluster.connect`,
`Cluster.start_local`) apply the same rule: `problem()` says what is wrong with a value, `check()` raises it as a
`ConfigError` naming the setting. A duration of nan never expires and one of inf waits forever, so neither is a
setting; a count past its cap is a typo, not a plan.
"""

from __future__ import annotations

import math

from flowspec.errors import ConfigError

__all__ = ["MAX_COUNT", "MAX_PID", "MAX_SECONDS", "MAX_STAGES", "MAX_THREADS", "check", "problem", "seconds"]

MAX_SECONDS = 86_400.0  # a day: the longest timeout or wait anyone means; past it is "never"
MAX_COUNT = 1 << 20  # tokens, prompts, tree nodes, faults: a million is past every model's context
MAX_STAGES = 256  # pipeline stages: past every model's layer count
MAX_THREADS = 1024
MAX_PID = 1 << 22  # Linux's largest pid_max


def problem(value: object, low: float, high: float, *, whole: bool = False, above: bool = False,
            below: bool = False, unit: str = "") -> str | None:
    """Why `value` is not a finite number in [low, high] (strictly above low with `above`, strictly below high with
    `below`; a whole number with `whole`), or None when it is. `unit` names what it counts ("seconds")."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (whole and not isinstance(value, int)):
        return f"must be a {'whole ' if whole else ''}number, got {value!r}"
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be a finite number{' of ' + unit if unit else ''}, got {value}"
    if low <= value <= high and not (above and value == low) and not (below and value == high):
        return None
    span = f"{int(low)}..{int(high)}" if whole else f"{'(' if above else '['}{low:g}, {high:g}{')' if below else ']'}"
    return f"must be in {span}{' ' + unit if unit else ''}, got {value if whole else format(value, 'g')}"


def check(value: float, name: str, low: float, high: float, *, whole: bool = False, above: bool = False,
          below: bool = False, unit: str = "") -> float:
    """`value` if `problem()` finds none, else a ConfigError naming `name`."""
    why = problem(value, low, high, whole=whole, above=above, below=below, unit=unit)
    if why is not None:
        raise ConfigError(f"{name} {why}")
    return value


def seconds(value: float, name: str, *, zero: bool = False) -> float:
    """A duration in seconds: finite, > 0 (>= 0 with `zero`: 0 = at once), at most a day."""
    return check(value, name, 0.0, MAX_SECONDS, above=not zero, unit="seconds")
