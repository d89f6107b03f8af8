"""Decoding modes and tree budgets, validated once."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from flowspec.errors import ConfigError

__all__ = ["Budget", "BudgetOverrides", "Mode"]


class Mode(enum.Enum):
    AR = "ar"  # autoregressive pipeline: one token per trip round the ring
    CHUNK = "chunk"  # Chunk-PP: a whole tree per round, pipelined in chunks, verified when all are back
    PIPEDEC = "pipedec"  # one new tree layer per pipeline step, verified layer by layer
    FLOWSPEC = "flowspec"  # score-ordered segments, step-wise verification, pruning, dynamic expansion

    @classmethod
    def parse(cls, text: str) -> Mode:
        try:
            return cls(text)
        except ValueError:
            names = ", ".join(m.value for m in cls)
            raise ConfigError(f"unknown mode {text!r}; choose one of {names}") from None


@dataclass(frozen=True, slots=True)
class Budget:
    """Tree budgets. Defaults suit CPU stages, where a forward over k tokens costs ~1 + k/8 single steps."""

    mode: Mode
    num_stages: int
    init_tokens: int = 12  # draft nodes in a round's first tree (chunk, flowspec)
    topk: int = 3  # children per beam node per level, and the beam width
    depth: int = 3  # beam levels after the first top-k level
    expand_tokens: int = 8  # draft nodes per dynamic expansion (flowspec)
    expand_depth: int = 3
    segment: int = 4  # max nodes per segment (flowspec); small segments keep each stage step cheap on CPU
    width: int = 3  # PipeDec layer width
    in_flight: int = 0  # segments in the pipeline at once; 0 = num_stages + 1 (one per link, as the paper)
    max_tree: int = 64  # live nodes the head keeps at most (bounds every stage's tree slots)
    eager_root: bool = False  # flowspec: send a fresh round's root before its tree is drafted (wins only when
    # drafting is fast next to a pipeline round trip; otherwise the root races ahead of its own drafts)
    expand_from_leaf: bool = False  # flowspec: expand below the best-scored leaf of the surviving tree instead
    # of re-drafting from the new root (deepens the likely path; the root's near levels are usually drafted)
    draft_ahead: bool = False  # flowspec: keep drafting below the best leaf while the pipeline works (for a head
    # with time to spare per stage step; the cost-based budgets turn it on)
    min_reach: float = 0.0  # flowspec: a segment's rows after its first, and drafting ahead, only for nodes the
    # draft gives at least this chance of being reached (a row's price on a device whose step grows per row)
    lookup: int = 4  # flowspec: tokens proposed after each verdict by prompt lookup (sched/lookup.py); 0 = off

    def __post_init__(self) -> None:
        if self.num_stages < 1:
            raise ConfigError(f"num_stages must be >= 1, got {self.num_stages}")
        for name in _AT_LEAST:
            _check_field(name, getattr(self, name))
        _check_field("min_reach", self.min_reach)
        if self.max_tree < max(self.init_tokens, self.expand_tokens) + 1:
            raise ConfigError("max_tree must exceed init_tokens and expand_tokens")

    @property
    def slots(self) -> int:
        """Segments kept in the pipeline at once."""
        if self.mode is Mode.AR:
            return 1
        return self.in_flight or self.num_stages + 1

    @property
    def tree_slack(self) -> int:
        """KV slots a stage needs beyond the committed context: live tree plus rows in flight."""
        return self.max_tree + self.slots * max(self.segment, self.width, self.init_tokens + 1)


_TUNABLE = tuple(f.name for f in fields(Budget) if f.name not in ("mode", "num_stages"))
_AT_LEAST = {"init_tokens": 1, "topk": 1, "expand_tokens": 1, "segment": 1, "width": 1, "max_tree": 2,
             "depth": 0, "expand_depth": 0, "in_flight": 0, "lookup": 0}


def _check_field(name: str, value: Any) -> None:
    """One field's own range (Budget checks the rule across fields, max_tree against the trees, itself)."""
    if name in _AT_LEAST and value < _AT_LEAST[name]:
        raise ConfigError(f"{name} must be >= {_AT_LEAST[name]}, got {value}")
    if name == "min_reach" and not 0.0 <= value < 1.0:
        raise ConfigError(f"min_reach must be in [0, 1), got {value}")


@dataclass(frozen=True, slots=True)
class BudgetOverrides:
    """The Budget fields a user set (flags, a request's `budget`, the HTTP server's config); None: let the
    runtime choose (flowspec.sched.costs.choose_budget). Each value set is checked as it is built, by Budget's
    own rule, so a bad one is refused before any request runs."""

    init_tokens: int | None = None
    topk: int | None = None
    depth: int | None = None
    expand_tokens: int | None = None
    expand_depth: int | None = None
    segment: int | None = None
    width: int | None = None
    in_flight: int | None = None
    max_tree: int | None = None
    eager_root: bool | None = None
    expand_from_leaf: bool | None = None
    draft_ahead: bool | None = None
    min_reach: float | None = None
    lookup: int | None = None

    def __post_init__(self) -> None:
        for name, value in self.items():
            kind = type(getattr(_DEFAULTS, name))  # bool, int or float
            if kind is bool:
                right_type = type(value) is bool
            else:  # a bool is an int to Python, never a count or a fraction here
                right_type = not isinstance(value, bool) and isinstance(value, (int, float) if kind is float else int)
            if not right_type:
                raise ConfigError(f"budget field {name} takes {'an' if kind is int else 'a'} {kind.__name__}, got {value!r}")
            _check_field(name, value)

    @classmethod
    def of(cls, given: BudgetOverrides | Mapping[str, Any] | None) -> BudgetOverrides:
        """From a mapping of field -> value (an app's dict, a JSON body); unknown fields are refused by name."""
        if given is None:
            return cls()
        if isinstance(given, BudgetOverrides):
            return given
        unknown = sorted(set(given) - set(_TUNABLE))
        if unknown:
            raise ConfigError(f"unknown budget field(s) {', '.join(unknown)}; known: {', '.join(_TUNABLE)}")
        return cls(**given)

    def items(self) -> list[tuple[str, Any]]:
        """The fields set, in Budget's order."""
        return [(name, getattr(self, name)) for name in _TUNABLE if getattr(self, name) is not None]


_DEFAULTS = Budget(Mode.FLOWSPEC, 1)
