"""`flowspec bench`: every decoding mode side by side on the same prompts, on one (emulated) testbed."""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flowspec.bench.report import (
    PIPELINE_MODES,
    REFERENCE_MODES,
    concurrency_markdown,
    markdown,
    merge_kinds,
    node_kinds,
    quantile,
    summarize,
    summary_line,
)
from flowspec.errors import ConfigError
from flowspec.store.shard import check_layer_count

if TYPE_CHECKING:
    from flowspec.bench.profiles import Profile
    from flowspec.sched import Budget

__all__ = ["add_bench_command", "bench_args", "bench_command", "run_bench"]


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
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in PIPELINE_MODES + REFERENCE_MODES]
    if bad or not modes:
        raise ConfigError(f"unknown mode(s) {bad}: choose from {', '.join(PIPELINE_MODES + REFERENCE_MODES)}")
    if args.layers is not None:
        check_layer_count(args.stages, args.layers)
    if args.concurrency:
        if any(m in REFERENCE_MODES for m in modes):
            raise ConfigError("--concurrency runs the pipeline modes only; drop hf/hf-assisted from --modes")
    results = asyncio.run(run_bench(args, modes))
    if args.concurrency:
        print(f"identical to solo outputs: {results['identical_outputs']}; wrote {args.out}/concurrency.json, "
              "concurrency.md", file=sys.stderr)
        return 0 if results["identical_outputs"] else 1
    for mode, m in results["modes"].items():
        print(f"{mode:>12}: {summary_line(m)}", file=sys.stderr)
    print(f"identical outputs: {results['identical_outputs']}; wrote {args.out}/results.json, results.md",
          file=sys.stderr)
    return 0 if results["identical_outputs"] else 1


# -- the run -------------------------------------------------------------------------------------------------
async def run_bench(args: argparse.Namespace, modes: list[str]) -> dict[str, Any]:
    """Run `modes` on the prompts of args.prompts; write args.out's reports; return the results."""
    import torch
    from tqdm import tqdm

    from flowspec.api import Cluster, Request, default_draft
    from flowspec.bench.node import emulation_args
    from flowspec.bench.profiles import load_profile
    from flowspec.bench.shaping import LinkShape
    from flowspec.bench.testbed import EmulatedBackend
    from flowspec.bench.timeline import idle_after_verdicts, plot_timeline
    from flowspec.cli.options import budget_overrides, formats, result_row
    from flowspec.model.precision import Precision, resolve_device
    from flowspec.net import Timeouts
    from flowspec.node.build import deployment
    from flowspec.node.head import GenerationResult
    from flowspec.node.local import LocalCluster
    from flowspec.prompts import read_prompt_dir
    from flowspec.store import make_drafter

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prompts = read_prompt_dir(args.prompts, args.per_task)
    pipeline = [m for m in modes if m in PIPELINE_MODES]
    refs = [m for m in modes if m in REFERENCE_MODES]
    overrides = budget_overrides(args)
    layers = args.layers
    draft = args.draft or default_draft(args.model)
    needs_draft = any(m not in ("ar", "hf") for m in modes)
    if needs_draft and draft is None:
        raise ConfigError(f"modes {modes} need a draft: pass --draft")
    if args.link and not args.profile:
        raise ConfigError("--link shapes the emulated testbed's links: give a --profile too")
    profile = load_profile(args.profile) if args.profile else None
    link = LinkShape.parse(args.link) if args.link else None
    device = str(resolve_device(args.device))  # the whole testbed runs on this machine
    precision = Precision.parse(args.dtype, args.quant, args.group_size, torch.device(device))
    dep = deployment(args.model, args.stages, layers, args.cache_dir, precision)
    real_drafter = (make_drafter(draft, args.model, args.cache_dir, precision=precision, device=device)
                    if needs_draft and draft else None)

    calibration = None
    dilation = args.dilation if args.dilation is not None else 1.0
    if profile is not None and args.dilation is None:
        from flowspec.bench.calibrate import calibrate

        rows = _segment_rows(pipeline, args.stages, profile, overrides)
        beam = _budget("flowspec", args.stages, profile, overrides).topk
        width = _budget("pipedec", args.stages, profile, overrides).width if "pipedec" in pipeline else 1
        calibration = calibrate(profile, dep, real_drafter, segment_rows=rows, beam=beam,
                                draft_rows=max(beam, width), margin=args.margin)
        dilation = calibration.dilation
        print(f"calibrated D = {dilation} (binding: {calibration.binding}, ratios "
              f"{ {k: round(v, 2) for k, v in calibration.ratios.items()} })", file=sys.stderr)
    args.dilation = dilation

    ms_per_s = 1e3 / dilation if profile is not None else 1e3  # emulated ms (real / D) when emulated
    stats_tpl = str(out / "stage-{index}.stats.jsonl")
    for k in range(1, args.stages + 1):
        Path(stats_tpl.format(index=k)).unlink(missing_ok=True)
    rows_out: list[dict[str, Any]] = []
    ran: dict[str, Budget] = {}  # mode -> the budget the runtime chose
    costs = None  # the cost lines the runtime measured at start-up
    first: dict[str, dict[str, Any]] = {}  # mode -> timeline data of the first prompt
    stats_pos = {k: 0 for k in range(1, args.stages + 1)}
    hf = _HFRefs(args, draft, refs) if refs else None
    if pipeline:
        # heartbeats ride the dilated, shaped links: give them room in proportion to D
        beat = 5.0 + 2.0 * dilation
        node_args = ["--heartbeat-timeout", str(beat), "--device", device, "--dtype", args.dtype, "--quant",
                     args.quant, "--group-size", str(args.group_size)]
        module = "flowspec.cli.node"
        head_backend = None
        if profile is not None:
            module = "flowspec.bench.node"
            node_args += [*emulation_args(args), "--stats-file", stats_tpl]
            head_backend = EmulatedBackend(profile, dilation, num_stages=args.stages, link=link, name="head")
        local = LocalCluster(args.model, args.stages, layers, args.cache_dir, extra_args=node_args, module=module)
        try:
            await local.start()
            async with await Cluster.connect(local.peers, model=args.model, draft=real_drafter,
                                             cache_dir=args.cache_dir, timeouts=Timeouts(heartbeat_timeout=beat),
                                             step_timeout=_step_timeout(prompts, profile, dilation, args.stages),
                                             backend=head_backend,
                                             **{**formats(args), "device": device}) as cluster:
                if args.concurrency:
                    levels = args.concurrency
                    sweep = await _concurrency_sweep(cluster, pipeline, prompts, levels, args, overrides, dilation,
                                                     profile is not None)
                    (out / "concurrency.json").write_text(json.dumps(sweep, indent=1))
                    (out / "concurrency.md").write_text(concurrency_markdown(sweep))
                    return sweep
                # what the runtime chose from the costs it measured at start-up: that is what ran
                ran = {m: cluster.budget(Request(m, args.max_new_tokens, 0.0, 1.0, 0, overrides))
                       for m in pipeline if m != "ar"}
                costs = cluster.head.cost_model()
                bar = tqdm(total=len(prompts) * len(modes), desc="bench", unit="run", disable=args.no_progress,
                           file=sys.stderr)
                for p_index, prompt in enumerate(prompts):
                    for mode in modes:
                        bar.set_postfix_str(f"{prompt.source}/{prompt.id} {mode}")
                        if mode in REFERENCE_MODES:
                            assert hf is not None
                            row = hf.run(mode, prompt.text)
                            row.update(id=prompt.id, source=prompt.source, mode=mode)
                            rows_out.append(row)
                            bar.update(1)
                            continue
                        request = Request(mode, args.max_new_tokens, 0.0, 1.0, 0, overrides)
                        result = GenerationResult()
                        t0 = time.monotonic()
                        async for _ in cluster.stream_tokens(prompt.text, request, result):
                            pass
                        t1 = time.monotonic()
                        await asyncio.sleep(0.05)  # let the stages write their close reports
                        stage_reports = _read_stage_stats(stats_tpl, stats_pos)
                        head_report = head_backend.report() if head_backend is not None else {}
                        row = result_row(prompt, result, cluster, mode)
                        row.update(
                            source=prompt.source,
                            tokens_count=len(result.tokens),
                            total_s=round(result.total_s, 4),
                            decode_s=round(result.decode_s, 4),
                            head_overruns=head_report.get("overruns", 0),
                            overruns_by_kind=merge_kinds([head_report, *stage_reports.values()]),
                            stage_overruns={k: r.get("overruns", 0) for k, r in stage_reports.items()},
                            bytes_real=result.bytes_sent + sum(r.get("bytes_sent", 0)
                                                               for r in stage_reports.values()),
                            bytes_charged=head_report.get("bytes_charged", result.bytes_sent)
                            + sum(r.get("bytes_charged", 0) for r in stage_reports.values()),
                            head_busy_s=round(result.head_busy_s, 4),
                            overruns_by_node_kind=node_kinds(head_report, stage_reports, args.stages),
                            verdicts=len(result.verdict_times),
                            v1_idle_ms=[round(s * ms_per_s, 3) for s in
                                        idle_after_verdicts(result.verdict_times, result.busy.get(1, []))],
                        )
                        rows_out.append(row)
                        if p_index == 0:
                            first[mode] = {"busy": result.busy, "head": list(result.head_busy), "t0": t0, "t1": t1,
                                           "verdicts": list(result.verdict_times)}
                        bar.update(1)
                bar.close()
        finally:
            local.stop()
    elif hf is not None:
        for prompt in prompts:
            for mode in refs:
                row = hf.run(mode, prompt.text)
                row.update(id=prompt.id, source=prompt.source, mode=mode)
                rows_out.append(row)

    budgets = _budget_json(args, profile, ran)
    if costs is not None:
        budgets["measured_costs_s"] = costs.to_json()  # the lines the runtime measured (x D when emulated)
    results = summarize(args, modes, rows_out, dilation, profile, calibration, dep, budgets)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(markdown(results))
    for mode, data in first.items():
        plot_timeline(out / f"timeline-{mode}.png", data["busy"], data["head"], data["t0"], data["t1"],
                      dilation=dilation, verdicts=data["verdicts"], title=f"{mode}: {args.model}, {args.stages} stages, "
                      f"{args.profile or 'real CPU'}, {args.link or 'loopback'}, D={dilation:g}, "
                      f"prompt {prompts[0].source}/{prompts[0].id}")
    return results


async def _concurrency_sweep(cluster: Any, modes: list[str], prompts: list[Any], levels: list[int],
                             args: argparse.Namespace, overrides: dict[str, Any], dilation: float,
                             emulated: bool) -> dict[str, Any]:
    """For each mode and level c: c requests started together (prompts in turn), each checked against its solo
    output; aggregate tokens/s over the wall time, and each request's time to first token."""
    from flowspec.api import Request
    from flowspec.node.head import GenerationResult

    request = {mode: Request(mode, args.max_new_tokens, 0.0, 1.0, 0, overrides) for mode in modes}
    solo: dict[tuple[str, int], list[int]] = {}
    rows = []
    for c in levels:
        for mode in modes:
            picked = [i % len(prompts) for i in range(c)]
            for i in sorted(set(picked)):
                if (mode, i) not in solo:
                    solo[(mode, i)] = (await cluster.generate(prompts[i].text, request[mode])).tokens
            results = [GenerationResult() for _ in picked]

            async def one(i: int, result: GenerationResult, mode: str = mode) -> None:
                async for _ in cluster.stream_tokens(prompts[i].text, request[mode], result):
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
    return {"config": {"model": args.model, "draft": args.draft, "stages": args.stages, "profile": args.profile,
                       "link": args.link, "dilation": dilation, "emulated": emulated,
                       "max_new_tokens": args.max_new_tokens, "prompts": [f"{p.source}/{p.id}" for p in prompts],
                       "command": "flowspec " + " ".join(shlex.quote(a) for a in sys.argv[1:])},
            "rows": rows, "identical_outputs": all(r["identical_to_solo"] for r in rows)}


def _step_timeout(prompts: list[Any], profile: Profile | None, dilation: float, stages: int) -> float:
    """How long the head waits without progress: a prefill returns nothing until its last chunk has passed every
    stage, which on a slow profile (a Pi: 1.6 s per 60-token chunk and stage) takes minutes once dilated."""
    from flowspec.node.driver import PREFILL_CHUNK

    if profile is None:
        return max(60.0, 10 * dilation)
    longest = max((len(p.text) for p in prompts), default=0) // 2 + 64  # tokens, generously (chat template)
    chunks = -(-longest // PREFILL_CHUNK)
    prefill = profile.stage_cost(PREFILL_CHUNK, longest) * dilation * (chunks + stages)
    return max(60.0, 10 * dilation, 2 * prefill)


def _budget(mode: str, stages: int, profile: Profile | None, overrides: dict[str, Any]) -> Budget:
    """The Budget the runtime chooses for `mode`: from the profile's cost curves when emulating (dilation
    scales every curve alike, so the choice is the same), Budget's CPU defaults otherwise; flags win."""
    from flowspec.sched import Mode
    from flowspec.sched.costs import choose_budget

    return choose_budget(Mode.parse(mode), stages, profile.cost_model() if profile is not None else None,
                         **overrides)


def _segment_rows(modes: list[str], stages: int, profile: Profile | None, overrides: dict[str, Any]) -> int:
    """The largest segment (rows per stage forward) the run's modes send."""
    rows = 1
    for m in modes:
        b = _budget(m, stages, profile, overrides)
        if m == "flowspec":
            rows = max(rows, b.segment)
        elif m == "chunk":
            rows = max(rows, -(-(b.init_tokens + 1) // (stages + 1)))
        elif m == "pipedec":
            rows = max(rows, b.width)
    return rows


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

    def __init__(self, args: argparse.Namespace, draft: str | None, modes: list[str]) -> None:
        import torch

        from flowspec.store import load_hf_reference, load_tokenizer

        self.args = args
        self.tok = load_tokenizer(args.model, args.cache_dir)
        self.model = load_hf_reference(args.model, args.cache_dir)
        self.assistant = None
        if "hf-assisted" in modes:
            if draft is None:
                raise ConfigError("hf-assisted needs --draft")
            self.assistant = _hf_assistant(draft, args.model, args.cache_dir)
        self.torch = torch
        from flowspec.api import _eos_ids
        from flowspec.store import resolve

        self.eos = list(_eos_ids(resolve(args.model, args.cache_dir), self.tok, ()))

    def run(self, mode: str, text: str) -> dict[str, Any]:
        torch = self.torch
        ids = self.tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                           tokenize=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        inp = torch.tensor([ids])
        kw: dict[str, Any] = dict(max_new_tokens=self.args.max_new_tokens, do_sample=False,
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
                "tokens_per_s": round(len(tokens) / took, 3), "text": self.tok.decode(tokens, skip_special_tokens=True)}


def _hf_assistant(draft: str, target: str, cache_dir: str | None) -> Any:
    import re

    from flowspec.store import load_hf_reference

    m = re.fullmatch(r"self(?::layers=(\d+))?", draft)
    if m is None:
        return load_hf_reference(draft, cache_dir)
    model = load_hf_reference(target, cache_dir)
    if m.group(1):
        n = int(m.group(1))
        model.model.layers = model.model.layers[:n]
        model.config.num_hidden_layers = n
        if hasattr(model.config, "layer_types") and model.config.layer_types:
            model.config.layer_types = model.config.layer_types[:n]
    return model


def _budget_json(args: argparse.Namespace, profile: Profile | None, ran: dict[str, Budget]) -> dict[str, Any]:
    """The budget each tree mode ran with: as the runtime chose it from its start-up measurements (`ran`), else
    as chosen from the profile's curves; flags applied either way."""
    from dataclasses import fields

    from flowspec.cli.options import budget_overrides

    budgets = {m: ran.get(m) or _budget(m, args.stages, profile, budget_overrides(args))
               for m in ("chunk", "pipedec", "flowspec")}
    names = [f.name for f in fields(budgets["flowspec"]) if f.name not in ("mode", "num_stages")]
    return {m: {name: getattr(b, name) for name in names} for m, b in budgets.items()}


