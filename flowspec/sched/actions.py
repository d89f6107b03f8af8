"""Actions the head's scheduler returns for the I/O shell to carry out, in order."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, final

if TYPE_CHECKING:
    from flowspec.sched.growth import DraftJob

__all__ = ["Action", "BroadcastVerdict", "EmitTokens", "Finish", "RunDraft", "SendSegment"]


@final
@dataclass(frozen=True, slots=True)
class SendSegment:
    """Send these tree nodes into the pipeline (to the first stage). All tuples have the same length."""

    step: int  # segment number, request-local, 1, 2, 3, ...
    after: int  # the verdict seq a stage must have applied before computing this segment
    ids: tuple[int, ...]
    parents: tuple[int, ...]  # node id, or -1: child of the committed context
    positions: tuple[int, ...]  # absolute positions
    tokens: tuple[int, ...]


@final
@dataclass(frozen=True, slots=True)
class BroadcastVerdict:
    """Tell every stage what became committed context and which subtree survives (ARCHITECTURE.md)."""

    seq: int
    commit: tuple[int, ...]  # node ids, in sequence order, whose KV becomes context
    root: int  # node id of the new root; its subtree (and nodes newer than `watermark`) survive
    watermark: int  # largest node id created when the verdict was issued


@final
@dataclass(frozen=True, slots=True)
class RunDraft:
    """Drive this draft job with the drafter, then hand it back as `DraftReady(job)`."""

    job: DraftJob


@final
@dataclass(frozen=True, slots=True)
class EmitTokens:
    """Tokens committed to the output, in order."""

    tokens: tuple[int, ...]


@final
@dataclass(frozen=True, slots=True)
class Finish:
    """The request is over: `reason` is "eos", "length", "cancelled" or "error: ..."."""

    reason: str


Action = SendSegment | BroadcastVerdict | RunDraft | EmitTokens | Finish
