"""Every numeric flag of every command, fed nan, inf, -1, 0 and 1e30: one `error:` line and exit 2 at parse time,
before anything loads or connects, never a traceback or a hang.

The flags are discovered from the parsers (`flowspec.cli.build_parser()`, `flowspec.cli.node.node_parser()` and
the emulated node's), so a flag added later is covered as it lands. Each value is checked against the real parser
in-process (fast: all of them); a sample of them, spread over every command, flag and value, runs the real command
as a subprocess too. 0 parses only where it means something (ZERO_MEANS); the parser alone checks those.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from flowspec.bench.node import parser as emulated_node_parser
from flowspec.cli import build_parser
from flowspec.cli.node import node_parser
from flowspec.cli.options import Number, Numbers

ROOT = Path(__file__).resolve().parents[2]
HUGE_FLOAT, HUGE_INT = "1e30", "1" + "0" * 30
VALUES = ("nan", "inf", "-1", "0", HUGE_FLOAT, HUGE_INT)
# (command, flag) -> what 0 means there; everywhere else 0 is refused like the other values
ZERO_MEANS = {
    ("flowspec run", "--seed"): "a seed like any other",
    ("flowspec run", "--temperature"): "greedy",
    ("flowspec serve", "--shutdown-grace"): "end the answers in flight at once",
    ("flowspec chaos", "--seed"): "a seed like any other",
    ("flowspec-node", "--threads"): "torch's choice",
    ("flowspec.bench.node", "--threads"): "torch's choice",
    **{(cmd, "--recovery-timeout"): "fail at once" for cmd in ("flowspec run", "flowspec serve", "flowspec chaos")},
    **{(cmd, flag): "off / every node" for cmd in ("flowspec run", "flowspec serve", "flowspec bench")
       for flag in ("--lookup", "--min-reach")},
}


@dataclass(frozen=True)
class Command:
    name: str  # as a user types it, e.g. "flowspec run"
    argv: tuple[str, ...]  # the program (a subprocess's command line)
    path: tuple[str, ...]  # subcommand words before the flags
    parse: Callable[[list[str]], argparse.Namespace]  # the real parser, from the top
    parser: argparse.ArgumentParser  # the (sub)parser holding the flags
    base: tuple[str, ...]  # required arguments, so that a valid value parses


def _subparsers(parser: argparse.ArgumentParser, path: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...],
                                                                                           argparse.ArgumentParser]]:
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for word, sub in action.choices.items():
                yield from _subparsers(sub, (*path, word))


def _required(parser: argparse.ArgumentParser) -> tuple[str, ...]:
    """Arguments that satisfy the parser's required ones (each group's first choice, a valid-looking value)."""
    out: list[str] = []

    def give(action: argparse.Action) -> None:
        value = str(action.choices and next(iter(action.choices)) or "1")  # "1": a path, a name or a count
        if not action.option_strings:
            out.append(value)
        elif action.nargs == 0:
            out.append(action.option_strings[0])
        else:
            out.extend([action.option_strings[0], value])

    grouped = set()
    for group in parser._mutually_exclusive_groups:
        grouped |= {id(a) for a in group._group_actions}
        if group.required:
            give(group._group_actions[0])
    for action in parser._actions:
        if id(action) not in grouped and (action.required or not action.option_strings) \
                and not isinstance(action, argparse._SubParsersAction):
            give(action)
    return tuple(out)


def commands() -> list[Command]:
    top = build_parser()
    found = [Command(" ".join(("flowspec", *path)), (sys.executable, "-m", "flowspec"), path,
                     top.parse_args, sub, _required(sub))
             for path, sub in _subparsers(top, ()) if path]
    for name, argv, make in [("flowspec-node", (sys.executable, str(ROOT / "bin" / "flowspec-node")), node_parser),
                             ("flowspec.bench.node", (sys.executable, "-m", "flowspec.bench.node"),
                              emulated_node_parser)]:
        parser = make()
        found.append(Command(name, argv, (), parser.parse_args, parser, _required(parser)))
    return found


def numeric_flags(command: Command) -> list[str]:
    return [a.option_strings[0] for a in command.parser._actions
            if a.option_strings and (isinstance(a.type, (Number, Numbers)) or a.type in (int, float))]


COMMANDS = commands()
CASES = [(c, flag, value) for c in COMMANDS for flag in numeric_flags(c) for value in VALUES]


def _parse(command: Command, args: list[str]) -> tuple[argparse.Namespace | None, int | None, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            return command.parse([*command.path, *command.base, *args]), None, err.getvalue()
        except SystemExit as exc:
            return None, int(exc.code or 0), err.getvalue()


def _assert_one_error_line(stderr: str, flag: str) -> None:
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and f"argument {flag}" in errors[0], stderr


def test_every_command_with_a_numeric_flag_is_found() -> None:
    names = {c.name for c in COMMANDS if numeric_flags(c)}
    assert {"flowspec run", "flowspec serve", "flowspec demo", "flowspec bench", "flowspec chaos", "flowspec split",
            "flowspec-node", "flowspec.bench.node"} <= names, names
    assert len(CASES) > 400


def test_no_numeric_flag_escapes_the_checked_types() -> None:
    """A bare int or float type takes -1 and 1e30 (and a float nan and inf); an untyped flag with a numeric
    default is a number read later, unchecked."""
    loose = [(c.name, a.option_strings[0]) for c in COMMANDS for a in c.parser._actions if a.option_strings and (
        a.type in (int, float) or (a.type is None and a.nargs != 0 and isinstance(a.default, (int, float))
                                   and not isinstance(a.default, bool)))]
    assert not loose, f"use a type from flowspec.cli.options (Number, positive_int, duration, ...) for {loose}"


@pytest.mark.parametrize(("command", "flag", "value"), CASES,
                         ids=[f"{c.name}:{flag}={value[:6]}" for c, flag, value in CASES])
def test_the_parser_refuses_the_value_or_it_means_something(command: Command, flag: str, value: str) -> None:
    args, code, stderr = _parse(command, [flag, value])
    if value == "0" and (command.name, flag) in ZERO_MEANS:
        assert args is not None, f"{command.name} {flag} 0 ({ZERO_MEANS[command.name, flag]}) is refused:\n{stderr}"
        assert getattr(args, flag.removeprefix("--").replace("-", "_")) == 0
        return
    assert code == 2, f"{command.name} {flag} {value} parsed: {args}"
    _assert_one_error_line(stderr, flag)


def _sample() -> list[tuple[Command, str, str]]:
    """One run per command (an interpreter start each, most of it torch's import: on 2 busy cores more would
    take minutes), together covering every value, with a spread of flags."""
    out = []
    for i, command in enumerate(c for c in COMMANDS if numeric_flags(c)):
        flags = numeric_flags(command)
        flag, value = flags[(7 * i) % len(flags)], VALUES[i % len(VALUES)]
        if value == "0" and (command.name, flag) in ZERO_MEANS:
            flag = next(f for f in flags if (command.name, f) not in ZERO_MEANS)
        out.append((command, flag, value))
    return out


def test_the_real_commands_end_with_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("FLOWSPEC_LOG", None)

    def run(case: tuple[Command, str, str]) -> tuple[Command, str, str, subprocess.CompletedProcess[str]]:
        command, flag, value = case
        argv = [*command.argv, *command.path, *command.base, flag, value]
        # a generous bound: a refusal takes an interpreter start; a hang or a model load would take far longer
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
        return command, flag, value, done

    sample = _sample()
    assert {value for _, _, value in sample} == set(VALUES)
    with ThreadPoolExecutor(max_workers=3) as pool:
        for command, flag, value, done in pool.map(run, sample):
            assert done.returncode == 2, (command.name, flag, value, done.stderr)
            assert done.stdout == "", (command.name, flag, value, done.stdout)
            _assert_one_error_line(done.stderr, flag)
