"""`flowspec run --peers` as a user runs it against flowspec-node processes: a stage that starts 5 s after the
head is waited for (with a status line) and the answer is the fault-free one; requests that can never succeed,
a TLS mismatch with a stage (a plain head, a certificate the stage does not trust) and bad sampling flags end at
once with one clear line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flowspec.api import Request
from flowspec.node.local import free_ports
from tests.faults.conftest import DRAFT, NEW, PROMPT, SMOL, Pipeline, wait_listening
from tests.net.tls_certs import make_ca, make_leaf

pytestmark = pytest.mark.slow


def flowspec_run(pipe: Pipeline, *args: str) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "flowspec", "run", "--peers", str(pipe.local.peers_path), "--model", SMOL, *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "FLOWSPEC_LOG": "warning"})


async def test_a_stage_starting_5s_after_the_head_gets_the_fault_free_answer(pipe: Pipeline) -> None:
    reference = await pipe.reference(Request(mode="flowspec", max_new_tokens=NEW))
    pipe.local.kill_stage(2, signal.SIGKILL)
    run = flowspec_run(pipe, "--mode", "flowspec", "--draft", DRAFT, "--prompt", PROMPT,
                       "--max-new-tokens", str(NEW), "--json")
    try:
        time.sleep(5.0)
        assert run.poll() is None, f"the head gave up while stage 2 was down:\n{run.communicate()[1]}"
        pipe.restart(2)
        out, err = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate()
        pipe.wait_ready(2)
    assert run.returncode == 0, err
    assert f"waiting for stage 2 at {pipe.local.peers.stage(2).address}" in err, err
    assert json.loads(out.splitlines()[-1])["tokens"] == reference


@pytest.mark.parametrize(("args", "expected"), [
    (["--max-new-tokens", "100000"], "max_new_tokens (100000)"),
    (["--prompt", "lorem ipsum " * 3400], "past the model's context of 8192"),  # ~40,000 characters
])
def test_a_request_past_the_context_ends_at_once_with_one_line(pipe: Pipeline, args: list[str],
                                                                expected: str) -> None:
    base = ["--mode", "ar", "--prompt", "Hi"] if "--prompt" not in args else ["--mode", "ar"]
    started = time.monotonic()
    run = flowspec_run(pipe, *base, *args)
    out, err = run.communicate(timeout=60)
    assert run.returncode == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("flowspec run: error: ") and expected in lines[0], err
    assert time.monotonic() - started < 30, "the refusal took a recovery cycle"


@pytest.mark.parametrize(("flag", "value", "expected"), [
    ("--temperature", "-1", "must be >= 0"),
    ("--top-p", "1.5", "must be in (0, 1]"),
    ("--max-new-tokens", "0", "must be in 1..1048576, got 0"),
    ("--temperature", "nan", "finite"),
])
def test_bad_sampling_flags_are_usage_errors(flag: str, value: str, expected: str) -> None:
    run = subprocess.run([sys.executable, "-m", "flowspec", "run", "--local", "--prompt", "Hi", flag, value],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert f"argument {flag}: " in run.stderr and expected in run.stderr and "Traceback" not in run.stderr


@pytest.mark.parametrize("head_cert", ["none", "from another CA"])
def test_a_tls_mismatch_ends_at_once_with_one_line(tmp_path: Path, head_cert: str) -> None:
    """Not "waiting for stage 1" until the recovery timeout (set to ten minutes here): refused, saying what to do."""
    ca, other = make_ca(tmp_path, "ca"), make_ca(tmp_path, "other-ca")
    stage, stranger = make_leaf(tmp_path, "stage", ca), make_leaf(tmp_path, "stranger", other)
    head_port, stage_port = free_ports(2)
    peers = tmp_path / "peers.txt"
    peers.write_text(f"127.0.0.1:{head_port}\n127.0.0.1:{stage_port}\n")
    log = tmp_path / "stage.log"
    with open(log, "wb") as out:
        node = subprocess.Popen([sys.executable, "-m", "flowspec.cli.node", "--peers", str(peers), "--index", "1",
                                 "--model", SMOL, "--tls-cert", str(stage.cert), "--tls-key", str(stage.key),
                                 "--tls-ca", str(ca[0])], stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_listening("127.0.0.1", stage_port, node, "stage 1", log)
        tls = [] if head_cert == "none" else ["--tls-cert", str(stranger.cert), "--tls-key", str(stranger.key),
                                              "--tls-ca", str(ca[0])]
        run = subprocess.run([sys.executable, "-m", "flowspec", "run", "--peers", str(peers), "--model", SMOL,
                              "--mode", "ar", "--prompt", "Hi", "--recovery-timeout", "600", *tls],
                             capture_output=True, text=True, timeout=180, env={**os.environ, "FLOWSPEC_LOG": "warning"})
    finally:
        node.kill()
        node.wait(timeout=10)
    expected = {"none": "runs with TLS and this node without it: give this node --tls-cert/--tls-key/--tls-ca too",
                "from another CA": "refused this node's TLS certificate: it is not signed by the CA that stage "
                                   "trusts (its --tls-ca)"}[head_cert]
    assert run.returncode == 2, run
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith(f"flowspec run: error: stage 1 at 127.0.0.1:{stage_port} {expected}"), run.stderr
    assert "waiting for stage" not in run.stderr and "Traceback" not in run.stderr
