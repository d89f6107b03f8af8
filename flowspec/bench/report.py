"""`flowspec bench`'s reports: per-mode figures over the prompts (results.json), the markdown table, the CLI
summary lines, and the concurrency sweep's table."""

from __future__ import annotations

import os
import platform
import shlex
import statistics
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flowspec.bench.plan import BenchPlan

__all__ = ["PIPELINE_MODES", "REFERENCE_MODES", "concurrency_markdown", "markdown", "merge_kinds", "node_kinds",
           "quantile", "summarize", "summary_line"]

PIPELINE_MODES = ("ar", "chunk", "pipedec", "flowspec")
REFERENCE_MODES = ("hf", "hf-assisted")


def summarize(plan: BenchPlan, rows: list[dict[str, Any]], dilation: float, calibration: Any, dep: Any,
              budget: dict[str, Any]) -> dict[str, Any]:
    """results.json: per mode totals and rates over the prompts, whether outputs agreed, the run's config."""
    modes, profile = plan.modes, plan.profile
    by_prompt: dict[str, dict[str, list[int]]] = {}
    for r in rows:
        by_prompt.setdefault(f"{r['source']}/{r['id']}", {})[r["mode"]] = r["tokens"]
    pipeline_same = all(len({tuple(v) for m, v in d.items() if m in PIPELINE_MODES}) <= 1
                        for d in by_prompt.values())
    hf_same = all(len({tuple(v) for v in d.values()}) <= 1 for d in by_prompt.values())
    summary: dict[str, Any] = {}
    for mode in modes:
        rs = [r for r in rows if r["mode"] == mode]
        tokens = sum(r["tokens_count"] for r in rs)
        secs = sum(r["total_s"] for r in rs)
        rate = tokens / secs if secs else 0.0
        m: dict[str, Any] = {"prompts": len(rs), "tokens": tokens, "seconds": round(secs, 3),
                             "tokens_per_s": round(rate, 3)}
        if mode in PIPELINE_MODES:
            m.update(_pipeline_stats(rs, plan.stages, dilation if profile is not None else None))
        else:
            m.update({"emulated_tokens_per_s": None, "emulated_decode_tokens_per_s": None,
                      "note": "single process, real CPU, not emulated"})
        summary[mode] = m
    config = {
        "command": "flowspec " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv else "",
        "model": plan.model, "draft": plan.draft_arg, "stages": plan.stages, "layers": list(dep.counts),
        "profile": profile.name if profile is not None else None,
        "profile_source": profile.source if profile is not None else None,
        "link": plan.link_arg, "dilation": dilation,
        "calibration": calibration.to_json() if calibration is not None else None,
        "budget": budget, "max_new_tokens": plan.max_new_tokens,
        "prompts": plan.prompts_dir, "per_task": plan.per_task,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}, Python "
                   f"{platform.python_version()}",
        "notes": "tokens_per_s is real wall clock including prefill; decode_tokens_per_s counts from the first "
                 "token on; emulated = real x D. v1_idle_after_verdict_ms: how long stage 1 waited for work "
                 "after each verdict, in emulated ms (real / D). Stages run as local processes with one torch "
                 "thread each; the head runs in the bench process.",
    }
    return {"identical_outputs": pipeline_same, "identical_with_hf": hf_same if any(
        m in REFERENCE_MODES for m in modes) else None, "modes": summary,
        "prompts": [{k: v for k, v in r.items() if k != "text"} for r in rows], "config": config}


def _pipeline_stats(rs: list[dict[str, Any]], stages: int, dilation: float | None) -> dict[str, Any]:
    """One pipeline mode's figures over its rows; `dilation` None when not emulated (no emulated rates)."""
    tokens = sum(r["tokens_count"] for r in rs)
    secs = sum(r["total_s"] for r in rs)
    rate = tokens / secs if secs else 0.0
    steps = sum(r["steps"] for r in rs)
    verifs = sum(r["verifications"] for r in rs)
    accepted = sum(r["mean_accepted"] * r["verifications"] for r in rs)
    committed = sum(r["tokens_count"] - 1 for r in rs)
    decode = sum(r["decode_s"] for r in rs)
    decode_rate = committed / decode if decode else 0.0
    idle = [ms for r in rs for ms in r["v1_idle_ms"]]
    util = [round(sum(r["utilization"][k] * r["decode_s"] for r in rs) / decode, 3) if decode else 0.0
            for k in range(stages)]
    stage_over = [sum(int(r["stage_overruns"].get(k, r["stage_overruns"].get(str(k), 0))) for r in rs)
                  for k in range(1, stages + 1)]
    head_over = sum(r["head_overruns"] for r in rs)
    return {
        "emulated_tokens_per_s": round(rate * dilation, 3) if dilation else None,
        "decode_tokens_per_s": round(decode_rate, 3),
        "emulated_decode_tokens_per_s": round(decode_rate * dilation, 3) if dilation else None,
        "mean_accepted": round(accepted / verifs, 3) if verifs else 0.0,
        "tokens_per_step": round(committed / steps, 3) if steps else 0.0,
        "utilization": util,
        "head_busy": round(sum(r["head_busy_s"] for r in rs) / secs, 3) if secs else 0.0,
        "v1_idle_after_verdict_ms": {"mean": round(statistics.fmean(idle), 3) if idle else None,
                                     "p50": round(statistics.median(idle), 3) if idle else None,
                                     "verdicts": len(idle)},
        "bytes_per_token": round(sum(r["bytes_real"] for r in rs) / max(tokens, 1), 1),
        "charged_bytes_per_token": round(sum(r["bytes_charged"] for r in rs) / max(tokens, 1), 1),
        "overruns": head_over + sum(stage_over),
        "overruns_by_node": {"head": head_over, **{f"V{k}": v for k, v in enumerate(stage_over, 1)}},
        "overruns_by_kind": merge_kinds([{"overruns_by_kind": r["overruns_by_kind"]} for r in rs]),
        "overruns_by_node_kind": _add_node_kinds([r["overruns_by_node_kind"] for r in rs]),
    }


def node_kinds(head: dict[str, Any], stages: dict[int, dict[str, Any]], num_stages: int
                ) -> dict[str, dict[str, int]]:
    """Overruns by node (head, V1..VN) and work kind, from the nodes' reports (every node listed)."""
    nodes = {"head": head, **{f"V{k}": stages.get(k, {}) for k in range(1, num_stages + 1)}}
    return {name: {kind: int(n) for kind, n in (r.get("overruns_by_kind") or {}).items()}
            for name, r in nodes.items()}


def _add_node_kinds(rows: list[dict[str, dict[str, int]]]) -> dict[str, dict[str, int]]:
    """Per-node, per-kind overrun counts summed over requests."""
    total: dict[str, dict[str, int]] = {}
    for row in rows:
        for node, kinds in row.items():
            acc = total.setdefault(node, {})
            for kind, n in kinds.items():
                acc[kind] = acc.get(kind, 0) + n
    return total


def merge_kinds(reports: list[dict[str, Any]]) -> dict[str, int]:
    """Overruns by work kind (stage, lm_head, draft, draft_sync), summed over nodes."""
    total: dict[str, int] = {}
    for r in reports:
        for kind, n in (r.get("overruns_by_kind") or {}).items():
            total[kind] = total.get(kind, 0) + int(n)
    return total


def markdown(results: dict[str, Any]) -> str:
    c = results["config"]
    emulated = c["profile"] is not None
    lines = [f"# flowspec bench: {c['model']} ({c['draft'] or 'default draft'}), {c['stages']} stages",
             "", f"command: `{c['command']}`", "",
             f"machine: {c['machine']}", "",
             f"profile: {c['profile'] or 'none (real CPU)'}; link: {c['link'] or 'loopback, unshaped'}; "
             f"D = {c['dilation']:g}" + (f" (calibrated, binding {c['calibration']['binding']})"
                                         if c.get("calibration") else ""),
             "", f"identical outputs across pipeline modes: **{results['identical_outputs']}**"
             + (f"; identical with transformers: **{results['identical_with_hf']}**"
                if results.get("identical_with_hf") is not None else ""), ""]
    any_over = any((m.get("overruns") or 0) > 0 for m in results["modes"].values())
    lines.append("overruns: **" + ("YES: where listed, real compute exceeded the profile × D, so that node ran slower "
                                   "than the emulated device and the mode's emulated rate is pessimistic"
                                   if any_over else "none") + "**")
    header = ["mode", "tok/s real", "decode tok/s real", "tok/s emulated", "decode tok/s emulated",
              "mean accepted", "tokens/step", "stage utilization", "D0 busy",
              f"V1 idle after verdict, {'emulated ' if emulated else ''}ms (mean / p50)", "bytes/token real",
              "charged", "overruns"]
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for mode, m in results["modes"].items():
        if "utilization" not in m:
            cells = [mode, m["tokens_per_s"], "", "(real CPU, one process)"] + [""] * (len(header) - 4)
        else:
            idle = m["v1_idle_after_verdict_ms"]
            cells = [mode, m["tokens_per_s"], m["decode_tokens_per_s"],
                     m["emulated_tokens_per_s"] if emulated else "-",
                     m["emulated_decode_tokens_per_s"] if emulated else "-", m["mean_accepted"],
                     m["tokens_per_step"], "/".join(f"{u * 100:.0f}" for u in m["utilization"]) + " %",
                     f"{m['head_busy'] * 100:.0f} %", f"{_ms(idle['mean'])} / {_ms(idle['p50'])}",
                     f"{m['bytes_per_token']:.0f}", f"{m['charged_bytes_per_token']:.0f}",
                     _overruns_text(m["overruns_by_node_kind"])]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines.append("")
    return "\n".join(lines)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _overruns_text(by_node_kind: dict[str, dict[str, int]]) -> str:
    """Overruns per node, with their kinds: "head 3 (draft 3), V1 0, V2 0"."""
    parts = []
    for node, kinds in by_node_kind.items():
        detail = ", ".join(f"{kind} {n}" for kind, n in sorted(kinds.items()) if n)
        parts.append(f"{node} {sum(kinds.values())}" + (f" ({detail})" if detail else ""))
    return ", ".join(parts)


def summary_line(m: dict[str, Any]) -> str:
    """One mode's line of the CLI summary."""
    if "utilization" not in m:
        return f"{m['tokens_per_s']} tok/s real (single process, real CPU)"
    emu = (f", emulated {m['emulated_tokens_per_s']} tok/s end-to-end, {m['emulated_decode_tokens_per_s']} decode"
           if m["emulated_tokens_per_s"] is not None else "")
    return (f"{m['tokens_per_s']} tok/s real ({m['decode_tokens_per_s']} decode){emu}, mean accepted "
            f"{m['mean_accepted']}, util {m['utilization']}, D0 busy {m['head_busy'] * 100:.0f} %, V1 idle after "
            f"verdict {_ms(m['v1_idle_after_verdict_ms']['mean'])} ms mean, overruns "
            f"{_overruns_text(m['overruns_by_node_kind'])}")


def quantile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank quantile of an ascending list."""
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, max(0, -(-int(q * 100) * len(sorted_values) // 100) - 1))]


def concurrency_markdown(sweep: dict[str, Any]) -> str:
    c = sweep["config"]
    unit = f"emulated ({c['profile']}, {c['link']}, D = {c['dilation']:g})" if c["emulated"] else "real CPU"
    lines = [f"Concurrent clients, {c['model']} ({c['stages']} stages), {unit}; `{c['command']}`", "",
             "| mode | clients | aggregate tok/s | TTFT p50 s | TTFT p95 s | identical to solo |",
             "|---|---|---|---|---|---|"]
    for r in sweep["rows"]:
        lines.append(f"| {r['mode']} | {r['clients']} | {r['tokens_per_s']} | {r['ttft_p50_s']} | "
                     f"{r['ttft_p95_s']} | {'yes' if r['identical_to_solo'] else 'NO'} |")
    return "\n".join(lines) + "\n"
