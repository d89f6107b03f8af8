"""`flowspec run`: generate through a pipeline, streaming text, with per-request statistics."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from flowspec.api import Request
from flowspec.cli.options import (
    add_budget_args,
    add_pipeline_args,
    add_precision_args,
    add_sampling_args,
    add_tls_args,
    budget_overrides,
    check_pipeline_args,
    cluster_config,
    open_cluster,
    positive_int,
    result_row,
)
from flowspec.errors import ConfigError
from flowspec.node.head import GenerationResult
from flowspec.prompts import Prompt, read_prompt_file

__all__ = ["add_run_command"]

def add_run_command(sub: Any) -> None:
    p = sub.add_parser("run", help="generate text through a pipeline of stages",
                       formatter_class=argparse.RawDescriptionHelpFormatter, description="""\
Generate text through a pipeline. Either start the stages here (--local --stages N) or connect to running
`flowspec-node` processes (--peers peers.txt; this process is the head, line 1 of the file).

examples:
  flowspec run --local --stages 4 --model smollm2-135m --mode ar --prompt "Why is the sky blue?"
  flowspec run --local --stages 4 --model qwen2.5-coder-1.5b --draft qwen2.5-coder-0.5b --mode flowspec \\
      --prompt-file data/specbench/humaneval.jsonl --limit 3 --json
  flowspec run --peers peers.txt --model smollm2-135m --mode flowspec --draft self:layers=20 --prompt Hi
  flowspec run --peers peers.txt --model smollm2-135m --tls-cert head.pem --tls-key head.key --tls-ca ca.pem \\
      --prompt Hi""")
    add_pipeline_args(p)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="one user message")
    what.add_argument("--prompt-file", help="Spec-Bench JSONL: each line's first turn is a user message")
    p.add_argument("--limit", type=positive_int, help="only the first N prompts of --prompt-file")
    p.add_argument("--raw", action="store_true", help="send the prompt as raw text, without the chat template")
    add_sampling_args(p, max_new_tokens=128)
    p.add_argument("--json", action="store_true", help="one JSON object per prompt on stdout, no streaming")
    add_precision_args(p)
    add_tls_args(p)
    add_budget_args(p)
    p.set_defaults(handler=run_command)


def _prompts(args: argparse.Namespace) -> list[Prompt]:
    if args.prompt is not None:
        return [Prompt("prompt", args.prompt)]
    prompts = read_prompt_file(args.prompt_file, args.limit)
    if not prompts:
        raise ConfigError(f"prompt file {args.prompt_file} holds no prompts: nothing to do")
    return prompts


async def _run(args: argparse.Namespace, prompts: list[Prompt]) -> int:
    cluster = await open_cluster(args, cluster_config(args))
    request = Request(args.mode, args.max_new_tokens, args.temperature, args.top_p, args.seed,
                      budget_overrides(args))
    async with cluster:
        for prompt in prompts:
            result = GenerationResult()
            if args.json:
                async for _ in cluster.stream_tokens(prompt.text, request, result, chat=not args.raw):
                    pass
                print(json.dumps(result_row(prompt, result, cluster, args.mode)), flush=True)
                continue
            async for text in cluster.stream(prompt.text, request, result, chat=not args.raw):
                sys.stdout.write(text)
                sys.stdout.flush()
            row = result_row(prompt, result, cluster, args.mode)
            print(f"\n[{args.mode}] {len(result.tokens)} tokens, {row['tokens_per_s']} tokens/s, "
                  f"ttft {row['ttft_s']} s, {row['tokens_per_step']} tokens/step, "
                  f"mean accepted {row['mean_accepted']}, stage busy {row['utilization']}", file=sys.stderr)
    return 0


def run_command(args: argparse.Namespace) -> int:
    check_pipeline_args(args)
    prompts = _prompts(args)  # a bad or empty prompt file is one line now, not after loading the model
    return asyncio.run(_run(args, prompts))
