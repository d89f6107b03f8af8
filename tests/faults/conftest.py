"""Shared pieces of the fault tests: one 3-stage SmolLM2 pipeline on loopback (stage 2 has a standby= address
that only the standby test brings up), reused by every test through fresh heads, and the drafter loaded once.

Every test leaves the pipeline as it found it (all three stages up, the standby down); `Pipeline.healthy()`
checks that before a test starts.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flowspec.api import Cluster, Request
from flowspec.config import read_peers
from flowspec.model import Drafter
from flowspec.node.build import deployment
from flowspec.node.local import LocalCluster, free_ports
from flowspec.store import make_drafter
from flowspec.store.pull import pull
from flowspec.store.registry import RECEIPT, model_dir
from tests.jsonlog import json_events

SMOL = "smollm2-135m"
DRAFT = "self:layers=20"
PROMPT = "Explain in two sentences why pipelines help on slow devices."
NEW = 40


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def wait_listening(host: str, port: int, proc: subprocess.Popen[bytes], what: str, log: Path,
                   timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        assert proc.poll() is None, f"{what} exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
        try:
            socket.create_connection((host, port), timeout=1.0).close()
            return
        except OSError:
            assert time.monotonic() < deadline, f"{what} not listening:\n{log.read_text()[-3000:]}"
            time.sleep(0.05)


def log_events(path: Path) -> list[dict[str, Any]]:
    """The JSON log lines of one stage process (FLOWSPEC_LOG=info, stderr is a file: JSON renderer)."""
    return json_events(path)


class Pipeline:
    """3 SmolLM2 stage processes on loopback; stage 2 lists a standby address (down unless a test starts it)."""

    def __init__(self) -> None:
        deployment(SMOL, 3)  # split once here, not in racing processes
        self.local = LocalCluster(SMOL, 3)
        (self.standby_port,) = free_ports(1)
        lines = self.local.peers_path.read_text().splitlines()
        lines[2] += f"  standby=127.0.0.1:{self.standby_port}"  # line 0 is the head, line 2 is stage 2
        self.local.peers_path.write_text("\n".join(lines) + "\n")
        self.local.peers = read_peers(self.local.peers_path)
        self.standby: subprocess.Popen[bytes] | None = None
        self.standby_log = Path(self.local.peers_path).parent / "standby-2.log"
        self.drafter: Drafter | None = None
        self.refs: dict[str, list[int]] = {}

    def start(self) -> None:
        for k in (1, 2, 3):
            self.local.start_stage(k)
        for k in (1, 2, 3):
            self.wait_ready(k)

    def wait_ready(self, k: int) -> None:
        peer = self.local.peers.stage(k)
        wait_listening(peer.host, peer.port, self.local.procs[k], f"stage {k}", self.local.logs[k])

    def restart(self, k: int) -> None:
        self.local.start_stage(k)
        self.wait_ready(k)

    def start_standby(self) -> None:
        cmd = self.local.command(2) + ["--listen", f"127.0.0.1:{self.standby_port}"]
        with open(self.standby_log, "ab") as out:
            self.standby = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        wait_listening("127.0.0.1", self.standby_port, self.standby, "standby", self.standby_log)

    def stop_standby(self) -> None:
        if self.standby is not None and self.standby.poll() is None:
            self.standby.terminate()
            try:
                self.standby.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.standby.kill()
                self.standby.wait()
        self.standby = None

    def pid(self, k: int) -> int:
        return self.local.procs[k].pid

    def healthy(self) -> None:
        dead = [k for k, p in self.local.procs.items() if p.poll() is not None]
        assert not dead, f"stage processes {dead} died:\n{self.local.log_tail(dead[0])}"
        for k in (1, 2, 3):
            os.kill(self.pid(k), signal.SIGCONT)  # a failed SIGSTOP test must not leak a stopped stage

    async def head(self, **kw: Any) -> Cluster:
        cluster = await Cluster.connect(self.local.peers, model=SMOL, draft=DRAFT, **kw)
        cluster.head.drafter = self.drafter
        return cluster

    async def reference(self, request: Request) -> list[int]:
        """The fault-free tokens for PROMPT under `request`, computed once per request on a fresh head."""
        key = repr(request)
        if key not in self.refs:
            cluster = await self.head()
            try:
                result = await cluster.generate(PROMPT, request)
            finally:
                await cluster.aclose()
            assert result.recoveries == 0 and len(result.tokens) == request.max_new_tokens, result
            self.refs[key] = result.tokens
        return self.refs[key]

    def stop(self) -> None:
        self.stop_standby()
        for k in (1, 2, 3):
            if k in self.local.procs and self.local.procs[k].poll() is None:
                os.kill(self.local.procs[k].pid, signal.SIGCONT)
        self.local.stop()


@pytest.fixture(scope="session")
def pipeline() -> Iterator[Pipeline]:
    if not (model_dir(SMOL) / RECEIPT).is_file():
        pull(SMOL)
    old = os.environ.get("FLOWSPEC_LOG")
    os.environ["FLOWSPEC_LOG"] = "info"  # stage logs record request.open/closed: the tests read them
    p = Pipeline()
    try:
        p.start()
        p.drafter = make_drafter(DRAFT, SMOL)  # here, not on the event loop: loading blocks for seconds
        yield p
    finally:
        p.stop()
        if old is None:
            os.environ.pop("FLOWSPEC_LOG", None)
        else:
            os.environ["FLOWSPEC_LOG"] = old


@pytest.fixture
def pipe(pipeline: Pipeline) -> Pipeline:
    pipeline.healthy()
    return pipeline
