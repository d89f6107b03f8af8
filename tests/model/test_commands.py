"""The model subcommands parse, run, and turn errors into one line with exit code 2."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from flowspec.cli.models import add_commands


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="flowspec")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.handler(args)


def test_split_and_list(tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["split", str(tiny_llama), "--stages", "2", "--out", str(tmp_path / "s")]) == 0
    assert (tmp_path / "s" / "stage-2" / "manifest.json").is_file()
    assert run(["models", "list", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "not pulled" in out and str(tmp_path) in out


def test_errors_are_one_line(tiny_llama: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["split", str(tiny_llama), "--layers", "2,2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "sum to 4 but" in err and "give 2 numbers that sum to 5" in err
    with pytest.raises(SystemExit):
        run(["split", str(tiny_llama), "--layers", "a,b"])
