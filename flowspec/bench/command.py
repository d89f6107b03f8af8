"""`flowspec bench`: every decoding mode side by side on the same prompts, on one (emulated) testbed."""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flowspec.bench.plan import BenchPlan
from flowspec.bench.report import (
    REFERENCE_MODES,
    concurrency_markdown,
    markdown,
    merge_kinds,
    node_kinds,
    quantile,
    summarize,
    summary_line,
)
from flowspec.text import chat_ids

if TYPE_CHECKING:
    from flowspec.api import Cluster
    from flowspec.bench.calibrate import Calibration
    from flowspec.bench.testbed import EmulatedBackend
    from flowspec.model.drafter import Drafter
    from flowspec.node.build import Deployment
    from flowspec.prompts import Prompt
    from flowspec.sched import Budget
    from flowspec.store import DraftSpec

__all__ = ["BenchPlan", "Testbed", "add_bench_command", "bench_args", "bench_command", "run_bench", "testbed"]


def add_bench_command(sub: Any) -> None:
    from flowspec.bounds import MAX_THREADS
    from flowspec.cli.options import (
        Number,
        Numbers,
        add_budget_args,
        add_precision_args,
        factor,
        layer_counts,
        positive_int,
        stage_count,
    )

    p = sub.add_parser("bench", help="benchmark decoding modes side by side on an emulated edge testbed",
                       formatter_class=argparse.RawDescriptionHelpFormatter, description="""\
Run every mode on the same prompts in one invocation, interleaved (for each prompt, every mode in turn) so
machine drift hits every mode alike, on one local cluster of stage processes reused across modes. With
--profile every stage, the head's lm_head and its drafter are paced to a device cost profile, every ring hop
is shaped to --link and charges the profiled model's hidden rows, all slowed by a time dilation D (chosen by
a short calibration unless --dilation is given); emulated rates are real rates × D.

Writes OUT/results.json, OUT/results.md and OUT/timeline-<mode>.png (the first prompt).

examples:
  flowspec bench --modes ar,chunk,pipedec,flowspec --stages 4 --profile jetson-7b --link 150mbit,1ms \\
      --model qwen2.5-coder-1.5b --draft qwen2.5-coder-0.5b --prompts data/specbench --per-task 1 \\
      --max-new-tokens 64 --out bench-out
  flowspec bench --modes ar,flowspec,hf,hf-assisted --stages 2 --model smollm2-135m \\
      --draft self:layers=20 --prompts data/specbench --per-task 1 --max-new-tokens 32 --out /tmp/b""")
    p.add_argument("--modes", default="ar,chunk,pipedec,flowspec",
                   help="comma list of ar, chunk, pipedec, flowspec, and single-process references hf "
                        "(transformers generate) and hf-assisted (assisted generation with --draft)")
    p.add_argument("--stages", type=stage_count, default=4)
    p.add_argument("--layers", type=layer_counts, help="layers per stage, e.g. 8,8,7,7 (default balanced)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--draft", help="draft for chunk/pipedec/flowspec/hf-assisted (default: the model's usual)")
    p.add_argument("--profile", help="device cost profile: jetson-7b, jetson-agx-7b, pi5-8b or a TOML file")
    p.add_argument("--link", help="every ring hop, e.g. 150mbit,1ms, 1gbit,0.2ms, gbe, paper-150")
    p.add_argument("--dilation", type=factor, help="time dilation D (default: calibrated with --margin)")
    p.add_argument("--margin", type=factor, default=1.3, help="calibration headroom: D = margin × worst ratio")
    p.add_argument("--prompts", default="data/specbench", help="folder of Spec-Bench *.jsonl files")
    p.add_argument("--per-task", type=positive_int, default=1, help="prompts taken from each *.jsonl (default 1)")
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--cache-dir", help="model cache (default $FLOWSPEC_CACHE or ~/.cache/flowspec)")
    p.add_argument("--threads", type=Number(1, MAX_THREADS), default=1,
                   help="torch threads of the head (this process); stages use 1 each (default 1: on a small "
                        "machine shared by N+1 processes, more threads mostly spin)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--concurrency", type=Numbers(positive_int, "1,2,4,8"),
                   help="instead of one request at a time: for each level, e.g. 1,2,4,8, that many clients at once "
                        "per mode (different prompts); writes OUT/concurrency.json and .md with aggregate tokens/s "
                        "and p50/p95 TTFT")
    add_precision_args(p)
    add_budget_args(p)
    p.set_defaults(handler=bench_command)


def bench_args(argv: list[str]) -> argparse.Namespace:
    """The arguments `flowspec bench ARGV...` runs with, defaults filled in (for callers of run_bench)."""
    parser = argparse.ArgumentParser(prog="flowspec")
    add_bench_command(parser.add_subparsers())
    return parser.parse_args(["bench", *argv])


def bench_command(args: argparse.Namespace) -> int:
    plan = BenchPlan.from_args(args)
    results = asyncio.run(run_bench(plan))
    if plan.concurrency:
        print(f"identical to solo outputs: {results['identical_outputs']}; wrote {plan.out}/concurrency.json, "
              "concurrency.md", file=sys.stderr)
        return 0 if results["identical_outputs"] else 1
    for mode, m in results["modes"].items():
        print(f"{mode:>12}: {summary_line(m)}", file=sys.stderr)
    print(f"identical outputs: {results['identical_outputs']}; wrote {plan.out}/results.json, results.md",
          file=sys.stderr)
    return 0 if results["identical_outputs"] else 1


# -- the run -------------------------------------------------------------------------------------------------
async def run_bench(plan: BenchPlan) -> dict[str, Any]:
    """Run the plan's modes on its prompts, each prompt through every mode in turn; write the reports into
    plan.out and return the results (the concurrency sweep's with plan.concurrency)."""
    import torch

    torch.set_num_threads(max(1, plan.threads))
    plan.out.mkdir(parents=True, exist_ok=True)
    for k in range(1, plan.stages + 1):
        Path(plan.stats_file(k)).unlink(missing_ok=True)
    async with testbed(plan) as bed:
        if plan.concurrency:
            sweep = await _concurrency_sweep(bed)
            (plan.out / "concurrency.json").write_text(json.dumps(sweep, indent=1))
            (plan.out / "concurrency.md").write_text(concurrency_markdown(sweep))
            return sweep
        ran = bed.chosen_budgets()
        costs = bed.cluster.head.cost_model() if bed.cluster is not None else None  # measured at start-up
        rows, first = await _run_prompts(bed)
    budgets = _budget_json(plan, ran)
    if costs is not None:
        budgets["measured_costs_s"] = costs.to_json()  # the lines the runtime measured (x D when emulated)
    results = summarize(plan, rows, bed.dilation, bed.calibration, bed.dep, budgets)
    (plan.out / "results.json").write_text(json.dumps(results, indent=1))
    (plan.out / "results.md").write_text(markdown(results))
    for mode, data in first.items():
        _plot(plan, mode, data, bed.dilation)
    return results


async def _run_prompts(bed: Testbed) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """Every prompt through every mode in turn (machine drift hits each mode alike): the rows, and each pipeline
    mode's timeline on the first prompt."""
    from tqdm import tqdm

    plan = bed.plan
    rows: list[dict[str, Any]] = []
    first: dict[str, dict[str, Any]] = {}
    bar = tqdm(total=len(plan.prompts) * len(plan.modes), desc="bench", unit="run", disable=not plan.progress,
               file=sys.stderr)
    for p_index, prompt in enumerate(plan.prompts):
        for mode in plan.modes:
            bar.set_postfix_str(f"{prompt.source}/{prompt.id} {mode}")
            if mode in REFERENCE_MODES:
                assert bed.hf is not None
                rows.append(bed.hf.run(mode, prompt))
            else:
                row, timeline = await bed.run(mode, prompt)
                rows.append(row)
                if p_index == 0:
                    first[mode] = timeline
            bar.update(1)
    bar.close()
    return rows, first


def _plot(plan: BenchPlan, mode: str, data: dict[str, Any], dilation: float) -> None:
    from flowspec.bench.timeline import plot_timeline

    p = plan.prompts[0]
    plot_timeline(plan.out / f"timeline-{mode}.png", data["busy"], data["head"], data["t0"], data["t1"],
                  dilation=dilation, verdicts=data["verdicts"], title=f"{mode}: {plan.model}, {plan.stages} stages, "
                  f"{plan.profile_arg or 'real CPU'}, {plan.link_arg or 'loopback'}, D={dilation:g}, "
                  f"prompt {p.source}/{p.id}")


# -- the testbed ---------------------------------------------------------------------------------------------
@dataclass
class Testbed:
    """What a run runs on: the deployment, the time dilation D it runs at (given, or calibrated), the cluster of
    stage processes (None when only the references run) and the transformers references."""

    __test__ = False  # not a pytest test class, whatever imports it

    plan: BenchPlan
    dep: Deployment
    dilation: float
    calibration: Calibration | None
    cluster: Cluster | None
    head_backend: EmulatedBackend | None  # the head's pacing when emulated
    hf: _HFRefs | None
    stats_pos: dict[int, int] = field(default_factory=dict)  # stage -> close reports read so far

    def chosen_budgets(self) -> dict[str, Budget]:
        """What the runtime chose for each tree mode from the costs it measured at start-up: what ran."""
        if self.cluster is None:
            return {}
        return {m: self.cluster.budget(self.plan.request(m)) for m in self.plan.pipeline if m != "ar"}

    async def run(self, mode: str, prompt: Prompt) -> tuple[dict[str, Any], dict[str, Any]]:
        """One pipeline request: its row of results.json, and its timeline."""
        from flowspec.bench.timeline import idle_after_verdicts
        from flowspec.cli.options import result_row
        from flowspec.node.head import GenerationResult

        assert self.cluster is not None
        plan, result = self.plan, GenerationResult()
        t0 = time.monotonic()
        async for _ in self.cluster.stream_tokens(prompt.text, plan.request(mode), result):
            pass
        t1 = time.monotonic()
        await asyncio.sleep(0.05)  # let the stages write their close reports
        stage_reports = _read_stage_stats(plan.stats_file(), self.stats_pos)
        head_report = self.head_backend.report() if self.head_backend is not None else {}
        ms_per_s = 1e3 / self.dilation if plan.profile is not None else 1e3  # emulated ms (real / D) when emulated
        row = result_row(prompt, result, self.cluster, mode)
        row.update(
            source=prompt.source,
            tokens_count=len(result.tokens),
            total_s=round(result.total_s, 4),
            decode_s=round(result.decode_s, 4),
            head_overruns=head_report.get("overruns", 0),
            overruns_by_kind=merge_kinds([head_report, *stage_reports.values()]),
            stage_overruns={k: r.get("overruns", 0) for k, r in stage_reports.items()},
            bytes_real=result.bytes_sent + sum(r.get("bytes_sent", 0) for r in stage_reports.values()),
            bytes_charged=head_report.get("bytes_charged", result.bytes_sent)
            + sum(r.get("bytes_charged", 0) for r in stage_reports.values()),
            head_busy_s=round(result.head_busy_s, 4),
            overruns_by_node_kind=node_kinds(head_report, stage_reports, plan.stages),
            verdicts=len(result.verdict_times),
            v1_idle_ms=[round(s * ms_per_s, 3) for s in
                        idle_after_verdicts(result.verdict_times, result.busy.get(1, []))],
        )
        timeline = {"busy": result.busy, "head": list(result.head_busy), "t0": t0, "t1": t1,
                    "verdicts": list(result.verdict_times)}
        return row, timeline


@asynccontextmanager
async def testbed(plan: BenchPlan) -> AsyncIterator[Testbed]:
    """Load the deployment and the drafter, calibrate D (emulated, no --dilation), load the references, and
    start the stage processes for the pipeline modes; stop them on the way out, however it is left."""
    from flowspec.node.build import deployment
    from flowspec.store import make_drafter

    dep = deployment(plan.model, plan.stages, plan.layers, plan.cache_dir, plan.precision)
    drafter = (make_drafter(plan.draft, plan.model, plan.cache_dir, precision=plan.precision, device=plan.device)
               if plan.draft is not None else None)
    calibration = _calibrate(plan, dep, drafter) if plan.profile is not None and plan.dilation is None else None
    dilation = calibration.dilation if calibration is not None else plan.dilation or 1.0
    hf = _HFRefs(plan) if plan.refs else None
    async with _cluster(plan, drafter, dilation) as (cluster, head_backend):
        yield Testbed(plan, dep, dilation, calibration, cluster, head_backend, hf,
                      {k: 0 for k in range(1, plan.stages + 1)})


def _calibrate(plan: BenchPlan, dep: Deployment, drafter: Drafter | None) -> Calibration:
    from flowspec.bench.calibrate import calibrate

    assert plan.profile is not None
    beam = plan.budget("flowspec").topk
    width = plan.budget("pipedec").width if "pipedec" in plan.pipeline else 1
    calibration = calibrate(plan.profile, dep, drafter, segment_rows=plan.segment_rows, beam=beam,
                            draft_rows=max(beam, width), margin=plan.margin)
    print(f"calibrated D = {calibration.dilation} (binding: {calibration.binding}, ratios "
          f"{ {k: round(v, 2) for k, v in calibration.ratios.items()} })", file=sys.stderr)
    return calibration


@asynccontextmanager
async def _cluster(plan: BenchPlan, drafter: Drafter | None,
                   dilation: float) -> AsyncIterator[tuple[Cluster | None, EmulatedBackend | None]]:
    """The stage processes and the head connected to them (paced and shaped when emulated); (None, None)
    when no pipeline mode runs."""
    from flowspec.api import Cluster
    from flowspec.bench.node import emulation_args
    from flowspec.bench.testbed import EmulatedBackend
    from flowspec.config import ClusterConfig
    from flowspec.node.local import LocalCluster

    if not plan.pipeline:
        yield None, None
        return
    # heartbeats ride the dilated, shaped links: give them room in proportion to D
    config = ClusterConfig(model=plan.model, cache_dir=plan.cache_dir, heartbeat_timeout=5.0 + 2.0 * dilation,
                           step_timeout=plan.step_timeout(dilation), **plan.formats)
    node_args = config.stage_args()
    module = "flowspec.cli.node"
    head_backend = None
    if plan.profile is not None:
        assert plan.profile_arg is not None
        module = "flowspec.bench.node"
        node_args += [*emulation_args(plan.profile_arg, plan.link_arg, dilation), "--stats-file", plan.stats_file()]
        head_backend = EmulatedBackend(plan.profile, dilation, num_stages=plan.stages, link=plan.link, name="head")
    local = LocalCluster(plan.model, plan.stages, plan.layers, plan.cache_dir, extra_args=node_args, module=module)
    try:
        await local.start()
        async with await Cluster.connect(local.peers, config, backend=head_backend, drafter=drafter) as cluster:
            yield cluster, head_backend
    finally:
        local.stop()


async def _concurrency_sweep(bed: Testbed) -> dict[str, Any]:
    """For each pipeline mode and level c: c requests started together (prompts in turn), each checked against
    its solo output; aggregate tokens/s over the wall time, and each request's time to first token."""
    from flowspec.node.head import GenerationResult

    plan, cluster, dilation = bed.plan, bed.cluster, bed.dilation
    assert cluster is not None
    prompts, emulated = plan.prompts, plan.profile is not None
    solo: dict[tuple[str, int], list[int]] = {}
    rows = []
    for c in plan.concurrency:
        for mode in plan.pipeline:
            picked = [i % len(prompts) for i in range(c)]
            for i in sorted(set(picked)):
                if (mode, i) not in solo:
                    solo[(mode, i)] = (await cluster.generate(prompts[i].text, plan.request(mode))).tokens
            results = [GenerationResult() for _ in picked]

            async def one(i: int, result: GenerationResult, mode: str = mode) -> None:
                assert cluster is not None
                async for _ in cluster.stream_tokens(prompts[i].text, plan.request(mode), result):
                    pass

            t0 = time.monotonic()
            await asyncio.gather(*(one(i, r) for i, r in zip(picked, results)))
            wall = time.monotonic() - t0
            tokens = sum(len(r.tokens) for r in results)
            ttfts = sorted(r.ttft_s for r in results)
            scale = dilation if emulated else 1.0  # emulated time runs D times slower than the device's
            row = {
                "mode": mode, "clients": c, "tokens": tokens, "wall_s": round(wall, 3),
                "tokens_per_s": round(tokens / wall * scale, 3),
                "ttft_p50_s": round(quantile(ttfts, 0.5) / scale, 4),
                "ttft_p95_s": round(quantile(ttfts, 0.95) / scale, 4),
                "identical_to_solo": all(r.tokens == solo[(mode, i)] for i, r in zip(picked, results)),
            }
            rows.append(row)
            print(f"{mode:>9} x{c}: {row['tokens_per_s']} tok/s, ttft p50 {row['ttft_p50_s']} s, "
                  f"p95 {row['ttft_p95_s']} s, identical to solo: {row['identical_to_solo']}", file=sys.stderr)
    return {"config": {"model": plan.model, "draft": plan.draft_arg, "stages": plan.stages,
                       "profile": plan.profile_arg, "link": plan.link_arg, "dilation": dilation,
                       "emulated": emulated, "max_new_tokens": plan.max_new_tokens,
                       "prompts": [f"{p.source}/{p.id}" for p in prompts],
                       "command": "flowspec " + " ".join(shlex.quote(a) for a in sys.argv[1:])},
            "rows": rows, "identical_outputs": all(r["identical_to_solo"] for r in rows)}


def _read_stage_stats(tpl: str, pos: dict[int, int]) -> dict[int, dict[str, Any]]:
    """New close reports of each stage since the last call (one request at a time: one report each)."""
    reports: dict[int, dict[str, Any]] = {}
    for k in pos:
        path = Path(tpl.format(index=k))
        if not path.exists():
            continue
        lines = path.read_text().splitlines()
        for line in lines[pos[k]:]:
            r = json.loads(line)
            acc = reports.setdefault(k, {})
            for key in ("overruns", "paced_steps", "bytes_sent", "bytes_charged"):
                acc[key] = acc.get(key, 0) + int(r.get(key, 0))
            kinds = acc.setdefault("overruns_by_kind", {})
            for kind, n in (r.get("overruns_by_kind") or {}).items():
                kinds[kind] = kinds.get(kind, 0) + int(n)
            acc["worst_ratio"] = max(acc.get("worst_ratio", 0.0), float(r.get("worst_ratio", 0.0)))
        pos[k] = len(lines)
    return reports


class _HFRefs:
    """transformers' generate and assisted generation on the unsplit model, in this process (real CPU)."""

    def __init__(self, plan: BenchPlan) -> None:
        from flowspec.api import _eos_ids
        from flowspec.store import load_hf_reference, load_tokenizer, resolve

        self.max_new_tokens = plan.max_new_tokens
        self.tok = load_tokenizer(plan.model, plan.cache_dir)
        self.model = load_hf_reference(plan.model, plan.cache_dir)
        self.assistant = None
        if "hf-assisted" in plan.modes:
            assert plan.draft is not None  # the plan resolves a draft for every mode that drafts
            self.assistant = _hf_assistant(plan.draft, plan.model, plan.cache_dir)
        self.eos = list(_eos_ids(resolve(plan.model, plan.cache_dir), self.tok, ()))

    def run(self, mode: str, prompt: Prompt) -> dict[str, Any]:
        """One reference request: its row of results.json."""
        import torch

        ids = chat_ids(self.tok, [{"role": "user", "content": prompt.text}])
        inp = torch.tensor([ids])
        kw: dict[str, Any] = dict(max_new_tokens=self.max_new_tokens, do_sample=False,
                                  eos_token_id=self.eos or None, pad_token_id=(self.eos or [0])[0],
                                  attention_mask=torch.ones_like(inp))
        if mode == "hf-assisted":
            kw["assistant_model"] = self.assistant
        start = time.monotonic()
        with torch.no_grad():
            out = self.model.generate(inp, **kw)
        took = time.monotonic() - start
        tokens = [int(t) for t in out[0, len(ids):]]
        return {"tokens": tokens, "tokens_count": len(tokens), "total_s": round(took, 4),
                "tokens_per_s": round(len(tokens) / took, 3), "text": self.tok.decode(tokens, skip_special_tokens=True),
                "id": prompt.id, "source": prompt.source, "mode": mode}


def _hf_assistant(draft: DraftSpec, target: str, cache_dir: str | None) -> Any:
    """transformers' model for `draft`: the same model flowspec's drafter is (store.make_drafter)."""
    from flowspec.store import load_hf_reference

    assert draft.kind != "random", "BenchPlan refuses hf-assisted with the random draft"
    if draft.kind == "model":
        return load_hf_reference(draft.model, cache_dir)
    model = load_hf_reference(target, cache_dir)
    if draft.layers is not None:
        n = draft.layers
        model.model.layers = model.model.layers[:n]
        model.config.num_hidden_layers = n
        if hasattr(model.config, "layer_types") and model.config.layer_types:
            model.config.layer_types = model.config.layer_types[:n]
    return model


def _budget_json(plan: BenchPlan, ran: dict[str, Budget]) -> dict[str, Any]:
    """The budget each tree mode ran with: as the runtime chose it from its start-up measurements (`ran`), else
    as chosen from the profile's curves; flags applied either way."""
    budgets = {m: ran.get(m) or plan.budget(m) for m in ("chunk", "pipedec", "flowspec")}
    names = [f.name for f in fields(budgets["flowspec"]) if f.name not in ("mode", "num_stages")]
    return {m: {name: getattr(b, name) for name in names} for m, b in budgets.items()}
