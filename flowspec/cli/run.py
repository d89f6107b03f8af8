"""`flowspec run`: generate through a pipeline, streaming text, with per-request statistics."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from flowspec.api import Cluster, Request
from flowspec.cli.options import (
    WaitStatus,
    add_budget_args,
    add_precision_args,
    add_sampling_args,
    add_tls_args,
    budget_overrides,
    formats,
    positive_int,
    result_row,
    tls_config,
)
from flowspec.errors import ConfigError
from flowspec.net import Timeouts
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
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--local", action="store_true", help="start the stages as local processes on loopback")
    where.add_argument("--peers", help="peers file of running flowspec-node processes")
    p.add_argument("--stages", type=positive_int, default=4, help="stage processes for --local (default 4)")
    p.add_argument("--layers", help="layers per stage for --local, e.g. 8,8,7,7 (default balanced)")
    p.add_argument("--model", default="smollm2-135m", help="target model name or HF folder")
    p.add_argument("--draft", help="draft: a model sharing the target's tokenizer, self, self:layers=N, random")
    p.add_argument("--mode", default="flowspec", choices=["ar", "chunk", "pipedec", "flowspec"])
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="one user message")
    what.add_argument("--prompt-file", help="Spec-Bench JSONL: each line's first turn is a user message")
    p.add_argument("--limit", type=positive_int, help="only the first N prompts of --prompt-file")
    p.add_argument("--raw", action="store_true", help="send the prompt as raw text, without the chat template")
    add_sampling_args(p, max_new_tokens=128)
    p.add_argument("--json", action="store_true", help="one JSON object per prompt on stdout, no streaming")
    p.add_argument("--cache-dir", help="model cache (default $FLOWSPEC_CACHE or ~/.cache/flowspec)")
    p.add_argument("--secret-file", help="shared secret for --peers (else $FLOWSPEC_SECRET)")
    p.add_argument("--heartbeat-timeout", type=float,
                   help="seconds of silence before a stage is declared dead (default 5; with --local also "
                        "passed to the stage processes)")
    p.add_argument("--recovery-timeout", type=float, default=30.0,
                   help="seconds to wait for a lost stage to come back (restarted, or a standby= address) "
                        "before the request fails; 0 = fail at once (default 30)")
    add_precision_args(p)
    add_tls_args(p)
    add_budget_args(p)
    p.set_defaults(handler=run_command)


async def _run(args: argparse.Namespace) -> int:
    if args.prompt is not None:
        prompts = [Prompt("prompt", args.prompt)]
    else:
        prompts = read_prompt_file(args.prompt_file, args.limit)
    layers = [int(x) for x in args.layers.split(",")] if args.layers else None
    timeouts, node_args = None, []
    if args.heartbeat_timeout is not None:
        timeouts = Timeouts(heartbeat_interval=min(1.0, args.heartbeat_timeout / 4),
                            heartbeat_timeout=args.heartbeat_timeout)
        node_args = ["--heartbeat-timeout", repr(args.heartbeat_timeout)]
    if args.local:
        cluster = await Cluster.start_local(args.model, args.stages, draft=args.draft, layers=layers,
                                            cache_dir=args.cache_dir, timeouts=timeouts,
                                            node_args=node_args, recovery_timeout=args.recovery_timeout,
                                            **formats(args))
    else:
        from flowspec.config import load_secret

        status = WaitStatus()
        try:
            cluster = await Cluster.connect(args.peers, model=args.model, draft=args.draft,
                                            cache_dir=args.cache_dir, secret=load_secret(args.secret_file),
                                            timeouts=timeouts, recovery_timeout=args.recovery_timeout,
                                            on_waiting=status, tls=tls_config(args), **formats(args))
        finally:
            status.done()
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
    if args.stages < 1:
        raise ConfigError("--stages must be >= 1")
    if args.heartbeat_timeout is not None and args.heartbeat_timeout <= 0:
        raise ConfigError("--heartbeat-timeout must be > 0")
    if args.recovery_timeout < 0:
        raise ConfigError("--recovery-timeout must be >= 0 (0 = fail at once)")
    if args.local and (args.tls_cert or args.tls_key or args.tls_ca):
        raise ConfigError("--tls-cert/--tls-key/--tls-ca are for --peers; --local stages run on loopback")
    return asyncio.run(_run(args))
