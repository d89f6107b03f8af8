"""`flowspec demo`: the main job on the default models, flowspec next to the autoregressive pipeline.

On this machine every stage shares the same few cores, so real speeds cannot show what pipelining buys; the
demo then runs ar, pipedec and flowspec on the same prompt on the emulated edge testbed (`flowspec bench`'s
machinery: every node paced to a device profile, slowed by a calibrated time dilation D), where it shows.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from flowspec.api import Cluster, Request
from flowspec.cli.options import add_precision_args, formats, positive_int, stage_count
from flowspec.node.head import GenerationResult

__all__ = ["add_demo_command"]

DEFAULT_PROMPT = "Write a Python function that checks whether a string is a palindrome."
EMULATED_MODES = ("ar", "pipedec", "flowspec")


def add_demo_command(sub: Any) -> None:
    p = sub.add_parser("demo", help="run a local 4-stage flowspec pipeline next to ar on one prompt (int4), then "
                                    "ar, pipedec and flowspec on an emulated edge testbed",
                       description="Pull the models if needed, start a local pipeline, answer one prompt with "
                                   "--mode flowspec and with --mode ar, and print both speeds (real CPU). Then "
                                   "run ar, pipedec and flowspec on the same prompt on the emulated --profile "
                                   "testbed and print their emulated speeds side by side.")
    p.add_argument("--model", default="qwen2.5-coder-1.5b")
    p.add_argument("--draft", default=None, help="default: qwen2.5-coder-0.5b for the Qwen target")
    p.add_argument("--stages", type=stage_count, default=4)
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--cache-dir")
    # int4: the fastest format here (Qwen-1.5B ar decode 7.8 tok/s vs 2.0 in fp32, BENCHMARKS.md), and on this
    # prompt flowspec's answer equals ar's at int4; --quant none --dtype float32 is the exact format
    add_precision_args(p, quant="int4")
    g = p.add_argument_group("the emulated side by side")
    g.add_argument("--no-emulated", action="store_true", help="skip it (real CPU only)")
    g.add_argument("--profile", default="jetson-7b",
                   help="device cost profile: jetson-7b, jetson-agx-7b, pi5-8b or a TOML file (default jetson-7b)")
    g.add_argument("--link", default="150mbit,1ms", help="every ring hop (default 150mbit,1ms, as the paper's)")
    # 32 tokens: enough for several verifications per mode, and ar at ~0.5 real tok/s still ends in a minute
    g.add_argument("--emulated-tokens", type=positive_int, default=32, help="new tokens per mode (default 32)")
    g.add_argument("--out", default="demo-out", help="folder for its results and timelines (default demo-out)")
    p.set_defaults(handler=demo_command)


def _ensure_pulled(model: str, draft: str | None, cache_dir: str | None) -> None:
    """Pull the model and a draft that is another registered model, unless installed (paths are not pulled)."""
    from flowspec.store import DraftSpec, list_models
    from flowspec.store.pull import pull

    spec = DraftSpec.parse(draft) if draft else None
    names = [model] + ([spec.model] if spec is not None and spec.kind == "model" else [])
    have = {str(m["name"]) for m in list_models(cache_dir)}
    for name in names:
        if name not in have and not name.startswith(("/", ".")):
            print(f"pulling {name} (once) ...", file=sys.stderr)
            pull(name, cache_dir)


async def _demo(args: argparse.Namespace) -> int:
    from flowspec.api import default_draft
    from flowspec.config import ClusterConfig

    draft = args.draft or default_draft(args.model)
    _ensure_pulled(args.model, draft, args.cache_dir)
    print(f"starting {args.stages} local stages of {args.model} (draft {draft}) ...", file=sys.stderr)
    config = ClusterConfig(model=args.model, draft=draft, cache_dir=args.cache_dir, **formats(args))
    async with await Cluster.start_local(config=config, stages=args.stages) as c:
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
    if args.no_emulated:
        return 0 if same else 1
    emulated_same = await _emulated(args, draft)
    return 0 if same and emulated_same else 1


async def _emulated(args: argparse.Namespace, draft: str | None) -> bool:
    """ar, pipedec and flowspec on the prompt, on the emulated testbed; print them side by side. Returns
    whether the three outputs were identical."""
    from flowspec.bench.command import BenchPlan, bench_args, run_bench

    # the prompt as a Spec-Bench file, so that `flowspec bench --prompts OUT/prompt ...` reruns exactly this
    prompts = Path(args.out) / "prompt"
    prompts.mkdir(parents=True, exist_ok=True)
    (prompts / "demo.jsonl").write_text(json.dumps({"question_id": "demo", "turns": [args.prompt]}) + "\n")
    argv = ["--modes", ",".join(EMULATED_MODES), "--stages", str(args.stages), "--model", args.model,
            "--profile", args.profile, "--link", args.link, "--prompts", str(prompts),
            "--max-new-tokens", str(args.emulated_tokens), "--out", args.out, "--device", args.device,
            "--dtype", args.dtype, "--quant", args.quant, "--group-size", str(args.group_size)]
    argv += ["--draft", draft] if draft else []
    argv += ["--cache-dir", args.cache_dir] if args.cache_dir else []
    print(f"\n=== emulated {args.profile}: {', '.join(EMULATED_MODES)} on the same prompt "
          f"({args.emulated_tokens} tokens each) ===", flush=True)
    start = time.monotonic()
    results = await run_bench(BenchPlan.from_args(bench_args(argv)))
    took = time.monotonic() - start
    print(_side_by_side(results, args.out))
    print(f"(the emulated part took {took / 60:.1f} min of wall time; all numbers in {args.out}/results.md; "
          f"rerun it alone with: flowspec bench {shlex.join(argv)})")
    return bool(results["identical_outputs"])


def _side_by_side(results: dict[str, Any], out: str) -> str:
    """The emulated part's table, with its label (profile, D) and the identical-outputs check."""
    c, modes = results["config"], results["modes"]
    lines = [f"emulated {c['profile']} (time dilation D={c['dilation']:g}: every node paced to the profile x D, "
             f"links {c['link'] or 'unshaped'}; rates are real x D, i.e. as on the devices)", "",
             f"{'mode':>9} | {'tok/s end-to-end':>16} | {'tok/s decode':>12} | {'accepted per verification':>25} | "
             f"{'D0 busy':>7} | timeline"]
    for mode, m in modes.items():
        lines.append(f"{mode:>9} | {m['emulated_tokens_per_s']:>16.2f} | {m['emulated_decode_tokens_per_s']:>12.2f} | "
                     f"{m['mean_accepted']:>25.2f} | {m['head_busy'] * 100:>6.0f}% | {out}/timeline-{mode}.png")
    ar, fs = modes["ar"]["emulated_tokens_per_s"], modes["flowspec"]["emulated_tokens_per_s"]
    lines += ["", f"identical outputs ({', '.join(modes)}): {results['identical_outputs']}; flowspec / ar speed: "
              f"{fs / max(ar, 1e-9):.2f}x end-to-end"]
    over = {mode: m["overruns"] for mode, m in modes.items() if m["overruns"]}
    if over:
        lines.append(f"overruns (real compute slower than profile x D, so those rates are pessimistic): {over}")
    return "\n".join(lines)


def demo_command(args: argparse.Namespace) -> int:
    return asyncio.run(_demo(args))
