"""Decoding modes and tree budgets, validated once."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from flowspec.errors import ConfigError

__all__ = ["Budget", "Mode"]


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
        for name in ("init_tokens", "topk", "expand_tokens", "segment", "width", "max_tree"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("depth", "expand_depth", "in_flight", "lookup"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.min_reach < 1.0:
            raise ConfigError(f"min_reach must be in [0, 1), got {self.min_reach}")
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
