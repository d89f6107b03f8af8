"""Bad input to the real commands (subprocesses): one `error:` line and exit 2, before anything loads, never a
traceback, a hang or a silent success.

"Before anything loads" is shown without timing: the commands are given a model that does not exist, so a check
made after the model is resolved would answer with the unknown model instead of the problem under test.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FLOWSPEC = (sys.executable, "-m", "flowspec")
NODE = (sys.executable, str(ROOT / "bin" / "flowspec-node"))
NO_MODEL = "no-such-model"  # never resolved when the command refuses its input first
NOT_UTF8 = b"\xff\xfe\xe9 caf\xe9\n"


def run(program: tuple[str, ...], *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("FLOWSPEC_LOG", None)
    # a generous bound: a refusal takes an interpreter start; a hang or a model load would take far longer
    return subprocess.run([*program, *args], capture_output=True, text=True, timeout=120, env=env, cwd=cwd)


def assert_one_error(done: subprocess.CompletedProcess[str], *expected: str, usage: bool = False) -> None:
    """Exit 2 and one `error:` line holding each of `expected`; only that line on stderr, or argparse's usage
    lines before it (`usage`)."""
    assert "Traceback" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert len(errors) == 1 and all(e in errors[0] for e in expected), done.stderr
    if not usage:
        assert done.stderr.strip().splitlines() == errors, done.stderr


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A loopback port something else is listening on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- files that are not UTF-8, or hold nothing to do ---------------------------------------------------------
@pytest.mark.parametrize("program", ["run", "node"])
def test_a_peers_file_that_is_not_utf8_is_one_line(tmp_path: Path, program: str) -> None:
    peers = tmp_path / "peers.txt"
    peers.write_bytes(b"127.0.0.1:7000\n127.0.0.1:7001  # " + NOT_UTF8)
    if program == "run":
        done = run(FLOWSPEC, "run", "--peers", str(peers), "--model", NO_MODEL, "--prompt", "Hi", cwd=tmp_path)
    else:
        done = run(NODE, "--peers", str(peers), "--index", "1", "--model", NO_MODEL, cwd=tmp_path)
    assert_one_error(done, f"peers file {peers} is not UTF-8", "save it as UTF-8")


def test_a_prompt_file_that_is_not_utf8_is_one_line(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_bytes(b'{"turns": ["' + NOT_UTF8.strip() + b'"]}\n')
    done = run(FLOWSPEC, "run", "--local", "--model", NO_MODEL, "--prompt-file", str(prompts), cwd=tmp_path)
    assert_one_error(done, f"prompt file {prompts} is not UTF-8")


def test_an_empty_prompt_file_is_nothing_to_do(tmp_path: Path) -> None:
    prompts = tmp_path / "empty.jsonl"
    prompts.write_text("\n\n")
    done = run(FLOWSPEC, "run", "--local", "--model", NO_MODEL, "--prompt-file", str(prompts), cwd=tmp_path)
    assert_one_error(done, f"prompt file {prompts} holds no prompts: nothing to do")
    assert done.stdout == ""


# -- where to listen: checked before the model loads -------------------------------------------------------
def test_a_node_on_a_port_in_use_says_so_before_loading(tmp_path: Path, taken_port: int) -> None:
    peers = tmp_path / "peers.txt"
    peers.write_text(f"127.0.0.1:{_free_port()}\n127.0.0.1:{taken_port}\n")
    done = run(NODE, "--peers", str(peers), "--index", "1", "--model", NO_MODEL, cwd=tmp_path)
    assert_one_error(done, f"cannot listen on 127.0.0.1:{taken_port}", "already in use",
                     "use another port on its line of the peers file")


def test_serve_on_a_port_in_use_says_so_before_loading(tmp_path: Path, taken_port: int) -> None:
    done = run(FLOWSPEC, "serve", "--local", "--model", NO_MODEL, "--port", str(taken_port), cwd=tmp_path)
    assert_one_error(done, f"cannot listen on 127.0.0.1:{taken_port}", "already in use", "choose another --port")


def test_an_insecure_node_on_a_name_that_does_not_resolve(tmp_path: Path) -> None:
    peers = tmp_path / "peers.txt"
    peers.write_text("127.0.0.1:7000\nno-such-host.invalid:7001\n")
    done = run(NODE, "--peers", str(peers), "--index", "1", "--model", NO_MODEL, "--insecure", cwd=tmp_path)
    assert_one_error(done, "cannot listen on no-such-host.invalid:7001", "does not resolve")


# -- flags: refused as they are parsed ---------------------------------------------------------------------
RUN_LOCAL = ("run", "--local", "--model", NO_MODEL, "--prompt", "Hi")


@pytest.mark.parametrize(("program", "args", "expected"), [
    (NODE, ("--threads", "-1"), "argument --threads: must be in 0..1024, got -1"),
    (NODE, ("--heartbeat-timeout", "nan"), "argument --heartbeat-timeout: must be a finite number of seconds"),
    (FLOWSPEC, (*RUN_LOCAL, "--heartbeat-timeout", "nan"), "argument --heartbeat-timeout: must be a finite"),
    (FLOWSPEC, (*RUN_LOCAL, "--recovery-timeout", "inf"), "argument --recovery-timeout: must be a finite"),
    (FLOWSPEC, (*RUN_LOCAL, "--recovery-timeout", "nan"), "argument --recovery-timeout: must be a finite"),
    (FLOWSPEC, (*RUN_LOCAL, "--layers", "abc"), "argument --layers: 'abc': expected a whole number"),
    (FLOWSPEC, ("serve", "--local", "--model", NO_MODEL, "--port", "70000"),
     "argument --port: must be in 1..65535, got 70000"),
], ids=["node-threads", "node-heartbeat", "run-heartbeat", "run-recovery-inf", "run-recovery-nan", "run-layers",
        "serve-port"])
def test_a_bad_flag_is_a_usage_error(tmp_path: Path, program: tuple[str, ...], args: tuple[str, ...],
                                     expected: str) -> None:
    if program == NODE:
        args = ("--peers", "peers.txt", "--index", "1", "--model", NO_MODEL, *args)
    assert_one_error(run(program, *args, cwd=tmp_path), expected, usage=True)


def test_a_layers_list_must_match_the_stages(tmp_path: Path) -> None:
    done = run(FLOWSPEC, *RUN_LOCAL, "--stages", "4", "--layers", "8,8", cwd=tmp_path)
    assert_one_error(done, "--stages 4 but --layers has 2 numbers; give one per stage")
