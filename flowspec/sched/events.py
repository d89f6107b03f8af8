"""Events the head's scheduler consumes. Don't subclass these: match on their types."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, final

if TYPE_CHECKING:
    import torch

    from flowspec.sched.growth import DraftJob

__all__ = ["Cancelled", "DraftError", "DraftReady", "Event", "Prefilled", "SegmentReturned", "StageError", "StageLost",
           "StepTimedOut"]


@final
@dataclass(frozen=True, slots=True)
class Prefilled:
    """The prompt went through every stage; `logits` is the target's distribution after its last token."""

    logits: torch.Tensor  # [V] float32


@final
@dataclass(frozen=True, slots=True)
class SegmentReturned:
    """Segment `step` came back from the last stage with the target's logits for its rows.

    `ids` are the rows the stages kept (they may have filtered dead ones); `logits[i]` is the target's
    next-token logits after node `ids[i]`. Rows the head already knows dead may be passed or left out.
    """

    step: int
    ids: tuple[int, ...]
    logits: torch.Tensor  # [len(ids), V] float32


@final
@dataclass(frozen=True, slots=True)
class DraftReady:
    """A draft job the scheduler asked for (`RunDraft`) has been driven to completion."""

    job: DraftJob


@final
@dataclass(frozen=True, slots=True)
class StageLost:
    """The shell lost stage `stage` (dead, stalled or unreachable): the request fails on this pipeline.

    The scheduler moves to ERROR and names the stage (`Scheduler.lost_stage`), so the shell can replace it and
    continue the committed tokens with `Scheduler.resume`.
    """

    stage: int
    reason: str


@final
@dataclass(frozen=True, slots=True)
class StageError:
    """Stage `stage` reported an `error` frame for this request: the request fails, the link stays up."""

    stage: int
    code: str
    reason: str


@final
@dataclass(frozen=True, slots=True)
class DraftError:
    """A draft job the scheduler asked for failed (a drafter bug, or its compute failed): the request fails."""

    reason: str


@final
@dataclass(frozen=True, slots=True)
class StepTimedOut:
    """Nothing the request waits for arrived within `seconds`: a stage is stalled or far too slow. The request
    fails, naming what it was waiting for (the pipeline may be whole: nothing says which stage to replace)."""

    seconds: float


@final
@dataclass(frozen=True, slots=True)
class Cancelled:
    """The client went away: the request finishes with reason "cancelled" (ignored once it has finished)."""

    reason: str = "cancelled by client"


Event = Prefilled | SegmentReturned | DraftReady | DraftError | StageLost | StageError | StepTimedOut | Cancelled
