"""`flowspec run` against a pipeline whose stage 2 is SIGSTOPped mid-answer, with heartbeats allowed to be
silent longer than the step timeout: the head's "no progress" StageTimeout ends the command with one
`error:` line and a non-zero exit, not an ExceptionGroup traceback (--step-timeout 2)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.faults.conftest import SMOL, Pipeline

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
STEP_TIMEOUT_S = 2  # the stopped stage never answers while stopped: any step timeout ends the request


def first_output(proc: subprocess.Popen[str], timeout_s: float) -> str:
    """The first character the command streams to stdout: the answer has started."""
    assert proc.stdout is not None
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.append(proc.stdout.read(1) if proc.stdout else ""), daemon=True)
    reader.start()
    reader.join(timeout_s)
    assert got and got[0], f"no answer started within {timeout_s} s (exit {proc.poll()})"
    return got[0]


def test_flowspec_run_with_a_stalled_stage_ends_with_one_error_line(pipe: Pipeline) -> None:
    cmd = [sys.executable, "-m", "flowspec", "run", "--step-timeout", str(STEP_TIMEOUT_S), "--peers",
           str(pipe.local.peers_path), "--model", SMOL, "--mode", "ar", "--max-new-tokens", "2000",
           "--prompt", "Write a long story about a lighthouse keeper and her cat.",
           "--heartbeat-timeout", "120", "--recovery-timeout", "0"]
    env = {**os.environ, "FLOWSPEC_LOG": "warning", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        first_output(proc, 120)
        os.kill(pipe.pid(2), signal.SIGSTOP)
        out, err = proc.communicate(timeout=120)
    finally:
        os.kill(pipe.pid(2), signal.SIGCONT)
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 2, (proc.returncode, err)
    assert "Traceback" not in err and "ExceptionGroup" not in err, err
    errors = [line for line in err.splitlines() if "error: " in line]
    assert len(errors) == 1, err
    print(f"\n[faults] {errors[0]}")
    assert errors[0].startswith(f"flowspec run: error: no progress for {STEP_TIMEOUT_S} s: a stage is stalled"), err
