#!/usr/bin/env python3
"""How often does a lower precision make a speculative mode differ from `ar` at that same precision, and why?

    .venv/bin/python scripts/precision_check.py --model smollm2-135m --draft self:layers=20 --stages 2 \
        --quant int8 --modes flowspec,pipedec --per-task 1 --max-new-tokens 48 --out /tmp/precision.json

For each Spec-Bench prompt (the first `--per-task` of every task file), generate greedily with `ar` and with each
speculative mode on the same local pipeline in the chosen format. Where they differ, report the first diverging
position and the target's top-2 logit margin there (from a single-process forward of the same prefix in the same
format): batch-dependent rounding flips only near-ties, so every divergence should come with a tiny margin.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flowspec.api import Cluster, Request, default_draft  # noqa: E402
from flowspec.model.precision import Precision  # noqa: E402
from flowspec.prompts import read_prompt_dir  # noqa: E402


def top2_margin(model: object, head: object, ids: list[int]) -> float:
    """The target's top-1 minus top-2 logit after `ids`, one single-process forward in the run's format."""
    import torch

    stage, lm = model, head
    cache = stage.new_cache(len(ids) + 1)  # type: ignore[attr-defined]
    hidden = stage.forward(torch.tensor(ids), torch.arange(len(ids)), cache)  # type: ignore[attr-defined]
    logits = lm.forward(hidden[-1:])[0]  # type: ignore[attr-defined]
    top = torch.topk(logits.float(), 2).values
    return float(top[0] - top[1])


async def run(args: argparse.Namespace) -> dict[str, object]:
    from flowspec.store import load_full

    precision = Precision.parse(args.dtype, args.quant, args.group_size)
    prompts = read_prompt_dir(args.prompts, args.per_task)
    modes = [m for m in args.modes.split(",") if m]
    draft = args.draft or default_draft(args.model)
    rows: list[dict[str, object]] = []
    contexts: dict[str, tuple[list[int], list[int]]] = {}  # prompt -> (its ids, ar's tokens)
    async with await Cluster.start_local(args.model, args.stages, draft=draft, cache_dir=args.cache_dir,
                                         dtype=precision.dtype, quant=precision.quant,
                                         group_size=precision.group_size, device="cpu") as cluster:
        for prompt in prompts:
            ids = cluster.encode(prompt.text)
            ar = (await cluster.generate(ids, Request("ar", args.max_new_tokens))).tokens
            contexts[f"{prompt.source}/{prompt.id}"] = (ids, ar)
            for mode in modes:
                spec = (await cluster.generate(ids, Request(mode, args.max_new_tokens))).tokens
                first = next((i for i, (a, b) in enumerate(zip(ar, spec)) if a != b), None)
                if first is None and len(ar) != len(spec):
                    first = min(len(ar), len(spec))
                rows.append({"prompt": f"{prompt.source}/{prompt.id}", "mode": mode, "tokens": len(ar),
                             "identical": first is None, "first_divergence": first})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    diverged = [r for r in rows if not r["identical"]]
    if diverged:
        model, head = load_full(args.model, args.cache_dir, None, precision)
        for r in diverged:
            ids, ar = contexts[str(r["prompt"])]
            position = int(str(r["first_divergence"]))
            r["margin_at_divergence"] = round(top2_margin(model, head, ids + ar[:position]), 5)
    return {"model": args.model, "draft": draft, "stages": args.stages, "precision": precision.tag,
            "max_new_tokens": args.max_new_tokens, "runs": len(rows), "identical": len(rows) - len(diverged),
            "rows": rows, "command": " ".join(sys.argv)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--draft")
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--quant", default="int8")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--modes", default="flowspec,pipedec,chunk")
    p.add_argument("--prompts", default=str(ROOT / "data" / "specbench"))
    p.add_argument("--per-task", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--cache-dir")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    result = asyncio.run(run(args))
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"{result['identical']}/{result['runs']} runs identical to ar at {result['precision']}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
