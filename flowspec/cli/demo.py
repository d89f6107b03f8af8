"""`flowspec demo`: the main job on the default models, flowspec next to the autoregressive pipeline."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from flowspec.api import Cluster, Request
from flowspec.cli.options import add_precision_args, formats, positive_int
from flowspec.node.head import GenerationResult

__all__ = ["add_demo_command"]

DEFAULT_PROMPT = "Write a Python function that checks whether a string is a palindrome."


def add_demo_command(sub: Any) -> None:
    p = sub.add_parser("demo", help="run a local 4-stage flowspec pipeline next to ar on one prompt (int4)",
                       description="Pull the models if needed, start a local pipeline, answer one prompt with "
                                   "--mode flowspec and with --mode ar, and print both speeds.")
    p.add_argument("--model", default="qwen2.5-coder-1.5b")
    p.add_argument("--draft", default=None, help="default: qwen2.5-coder-0.5b for the Qwen target")
    p.add_argument("--stages", type=positive_int, default=4)
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--cache-dir")
    # int4: the fastest format here (Qwen-1.5B ar decode 7.8 tok/s vs 2.0 in fp32, BENCHMARKS.md), and on this
    # prompt flowspec's answer equals ar's at int4; --quant none --dtype float32 is the exact format
    add_precision_args(p, quant="int4")
    p.set_defaults(handler=demo_command)


def _ensure_pulled(names: list[str], cache_dir: str | None) -> None:
    from flowspec.store import list_models
    from flowspec.store.pull import pull

    have = {str(m["name"]) for m in list_models(cache_dir)}
    for name in names:
        if name not in have and not name.startswith(("self", "random", "/", ".")):
            print(f"pulling {name} (once) ...", file=sys.stderr)
            pull(name, cache_dir)


async def _demo(args: argparse.Namespace) -> int:
    from flowspec.api import default_draft

    draft = args.draft or default_draft(args.model)
    _ensure_pulled([args.model] + ([draft] if draft else []), args.cache_dir)
    print(f"starting {args.stages} local stages of {args.model} (draft {draft}) ...", file=sys.stderr)
    async with await Cluster.start_local(args.model, args.stages, draft=draft, cache_dir=args.cache_dir,
                                         **formats(args)) as c:
        fmt = c.dep.precisions[1]
        print(f"number format: {fmt.tag} on {c.device}"
              + ("" if fmt.exact else " (fast; --quant none --dtype float32 is token-identical to transformers)"),
              file=sys.stderr)
        results: dict[str, GenerationResult] = {}
        for mode in ("flowspec", "ar"):
            print(f"\n=== {mode} ===", flush=True)
            result = GenerationResult()
            async for text in c.stream(args.prompt, Request(mode=mode, max_new_tokens=args.max_new_tokens),
                                       result):
                sys.stdout.write(text)
                sys.stdout.flush()
            results[mode] = result
            print(f"\n[{mode}] {len(result.tokens)} tokens in {result.total_s:.1f} s = "
                  f"{result.tokens_per_s:.2f} tokens/s (real CPU, all stages share this machine)", flush=True)
        same = results["flowspec"].tokens == results["ar"].tokens
        ratio = results["flowspec"].tokens_per_s / max(results["ar"].tokens_per_s, 1e-9)
        print(f"\nidentical outputs (flowspec vs ar, both {fmt.tag}): {same}; flowspec / ar speed: {ratio:.2f}x "
              f"(mean accepted per verification {results['flowspec'].stats.mean_accepted:.2f})")
        print("note: here every stage, the head and the drafter share this machine's cores, so speculation "
              "cannot show its pipeline gains; `flowspec bench --profile jetson-7b` emulates edge devices "
              "(see BENCHMARKS.md).")
        return 0 if same else 1


def demo_command(args: argparse.Namespace) -> int:
    return asyncio.run(_demo(args))
