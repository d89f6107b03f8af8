"""What one `flowspec bench` run does, decided once from its arguments: every check happens here, before a model
is loaded or a process started, and the run reads this plan instead of the argparse Namespace."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flowspec.bench.report import PIPELINE_MODES, REFERENCE_MODES
from flowspec.errors import ConfigError

if TYPE_CHECKING:
    from flowspec.api import Request
    from flowspec.bench.profiles import Profile
    from flowspec.bench.shaping import LinkShape
    from flowspec.model.precision import Precision
    from flowspec.prompts import Prompt
    from flowspec.sched import Budget, BudgetOverrides
    from flowspec.store import DraftSpec

__all__ = ["BenchPlan"]


@dataclass(frozen=True)
class BenchPlan:
    """The modes, prompts, testbed and reports of one run. Fields ending in `_arg` are the flags as given (the
    reports and the stage processes' command lines name them so); the others are parsed."""

    modes: tuple[str, ...]
    model: str
    draft_arg: str | None
    draft: DraftSpec | None  # --draft or the model's usual, when a mode drafts (hf-assisted included)
    stages: int
    layers: list[int] | None
    profile_arg: str | None
    profile: Profile | None  # None: real CPU, not emulated
    link_arg: str | None
    link: LinkShape | None
    dilation: float | None  # --dilation; None: calibrated by the testbed (with `margin`) when emulated
    margin: float
    prompts_dir: str
    per_task: int
    prompts: tuple[Prompt, ...]
    max_new_tokens: int
    out: Path
    cache_dir: str | None
    threads: int
    progress: bool
    concurrency: tuple[int, ...]  # client counts of the concurrency sweep; empty: one request at a time
    device: str  # resolved: the whole testbed runs on this machine
    dtype: str
    quant: str
    group_size: int
    precision: Precision
    overrides: BudgetOverrides  # the budget fields set by flags

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> BenchPlan:
        import torch

        from flowspec.api import default_draft
        from flowspec.bench.profiles import load_profile
        from flowspec.bench.shaping import LinkShape
        from flowspec.cli.options import budget_overrides
        from flowspec.model.precision import Precision, resolve_device
        from flowspec.prompts import read_prompt_dir
        from flowspec.store import DraftSpec

        modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
        bad = [m for m in modes if m not in PIPELINE_MODES + REFERENCE_MODES]
        if bad or not modes:
            raise ConfigError(f"unknown mode(s) {bad}: choose from {', '.join(PIPELINE_MODES + REFERENCE_MODES)}")
        levels = args.concurrency or ()  # --stages, --dilation, --layers, --concurrency: checked as parsed
        if levels and any(m in REFERENCE_MODES for m in modes):
            raise ConfigError("--concurrency runs the pipeline modes only; drop hf/hf-assisted from --modes")
        prompts = tuple(read_prompt_dir(args.prompts, args.per_task))
        draft = args.draft or default_draft(args.model)
        needs_draft = any(m not in ("ar", "hf") for m in modes)
        if needs_draft and draft is None:
            raise ConfigError(f"modes {list(modes)} need a draft: pass --draft")
        spec = DraftSpec.parse(draft) if needs_draft and draft else None
        if spec is not None and spec.kind == "random" and "hf-assisted" in modes:
            raise ConfigError("hf-assisted cannot use the random draft (it has no transformers model): give self, "
                              "self:layers=N or a model")
        if args.link and not args.profile:
            raise ConfigError("--link shapes the emulated testbed's links: give a --profile too")
        device = str(resolve_device(args.device))
        return cls(
            modes=modes, model=args.model, draft_arg=args.draft,
            draft=spec, stages=args.stages,
            layers=args.layers, profile_arg=args.profile,
            profile=load_profile(args.profile) if args.profile else None, link_arg=args.link,
            link=LinkShape.parse(args.link) if args.link else None, dilation=args.dilation, margin=args.margin,
            prompts_dir=args.prompts, per_task=args.per_task, prompts=prompts, max_new_tokens=args.max_new_tokens,
            out=Path(args.out), cache_dir=args.cache_dir, threads=args.threads, progress=not args.no_progress,
            concurrency=tuple(levels), device=device, dtype=args.dtype, quant=args.quant,
            group_size=args.group_size,
            precision=Precision.parse(args.dtype, args.quant, args.group_size, torch.device(device)),
            overrides=budget_overrides(args),
        )

    @property
    def pipeline(self) -> tuple[str, ...]:
        """The modes that run on the cluster of stage processes."""
        return tuple(m for m in self.modes if m in PIPELINE_MODES)

    @property
    def refs(self) -> tuple[str, ...]:
        """The single-process transformers references."""
        return tuple(m for m in self.modes if m in REFERENCE_MODES)

    @property
    def formats(self) -> dict[str, Any]:
        """The number format flags, as keyword arguments of `Cluster.connect`."""
        return {"device": self.device, "dtype": self.dtype, "quant": self.quant, "group_size": self.group_size}

    def request(self, mode: str) -> Request:
        from flowspec.api import Request

        return Request(mode, self.max_new_tokens, 0.0, 1.0, 0, self.overrides)

    def budget(self, mode: str) -> Budget:
        """The Budget the runtime chooses for `mode`: from the profile's cost curves when emulating (dilation
        scales every curve alike, so the choice is the same), Budget's CPU defaults otherwise; flags win."""
        from flowspec.sched import Mode, choose_budget

        return choose_budget(Mode.parse(mode), self.stages,
                             self.profile.cost_model() if self.profile is not None else None, self.overrides)

    @property
    def segment_rows(self) -> int:
        """The largest segment (rows per stage forward) the run's modes send: what calibration times."""
        from flowspec.sched import largest_segment

        return max((largest_segment(self.budget(m)) for m in self.pipeline), default=1)

    def stats_file(self, index: int | str = "{index}") -> str:
        """Where emulated stage `index` appends its close reports (the template, as the stages take it)."""
        return str(self.out / f"stage-{index}.stats.jsonl")

    def step_timeout(self, dilation: float) -> float:
        """How long the head waits without progress: a prefill returns nothing until its last chunk has passed
        every stage, which on a slow profile (a Pi: 1.6 s per 60-token chunk and stage) takes minutes once
        dilated."""
        from flowspec.node.driver import PREFILL_CHUNK

        if self.profile is None:
            return max(60.0, 10 * dilation)
        longest = max((len(p.text) for p in self.prompts), default=0) // 2 + 64  # tokens, generously (chat template)
        chunks = -(-longest // PREFILL_CHUNK)
        prefill = self.profile.stage_cost(PREFILL_CHUNK, longest) * dilation * (chunks + self.stages)
        return max(60.0, 10 * dilation, 2 * prefill)
