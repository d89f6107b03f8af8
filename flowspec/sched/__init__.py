"""Sans-IO decoding core: events in, actions out. No asyncio, sockets or model code in here."""

from flowspec.sched.actions import Action, BroadcastVerdict, EmitTokens, Finish, RunDraft, SendSegment
from flowspec.sched.budget import Budget, BudgetOverrides, Mode
from flowspec.sched.costs import CostModel, Line, choose_budget
from flowspec.sched.events import (
    Cancelled,
    DraftError,
    DraftReady,
    Event,
    Prefilled,
    SegmentReturned,
    StageError,
    StageLost,
    StepTimedOut,
)
from flowspec.sched.growth import Candidate, DraftJob, ExpandRequest, LayerGrowth, TreeGrowth
from flowspec.sched.policies import largest_segment
from flowspec.sched.sampling import SamplingParams, choose_token
from flowspec.sched.scheduler import TRANSITIONS, DecodeStats, Outcome, RequestState, Scheduler
from flowspec.sched.stage import Admission, Compaction, StageTree
from flowspec.sched.tree import CONTEXT, DraftTree, Node, NodeState

__all__ = [
    "CONTEXT", "TRANSITIONS", "Action", "Admission", "BroadcastVerdict", "Budget", "BudgetOverrides", "Cancelled", "Candidate", "Compaction",
    "CostModel", "DecodeStats", "DraftError", "DraftJob", "DraftReady", "DraftTree", "EmitTokens", "Event", "ExpandRequest", "Finish",
    "LayerGrowth", "Line", "Mode", "Node", "NodeState", "Outcome", "Prefilled", "RequestState", "RunDraft", "SamplingParams",
    "Scheduler", "SegmentReturned", "SendSegment", "StageError", "StageLost", "StageTree", "StepTimedOut", "TreeGrowth",
    "choose_budget", "choose_token", "largest_segment",
]
