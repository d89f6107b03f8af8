"""A live `flowspec serve --local --stages 2 --model smollm2-135m --draft self:layers=20` subprocess, started once
per module, and what the tests read of it: its URL, its API key, its stage processes' logs and its metrics."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from flowspec.node.local import free_ports
from tests.e2e.conftest import SMOL, require_model
from tests.jsonlog import json_events

API_KEY = "test-key-123"
DRAFT = "self:layers=20"
MAX_CONCURRENT = 4
MAX_BODY = 65536
STAGES = 2
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class LiveServer:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path
    stage_logs: dict[int, Path] = field(default_factory=dict)
    api_key: str = API_KEY

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=10) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def health(self) -> dict[str, Any]:
        return json.loads(self.get("/health")[1])  # type: ignore[no-any-return]

    def wait_idle(self, timeout_s: float = 30.0) -> dict[str, Any]:
        """Until no request runs and the head routes frames for none."""
        deadline = time.monotonic() + timeout_s
        while True:
            health = self.health()
            if health["running"] == 0 and health["open_requests"] == 0:
                return health
            assert time.monotonic() < deadline, f"requests still open after {timeout_s} s: {health}"
            time.sleep(0.1)

    def stage_events(self, k: int) -> list[dict[str, Any]]:
        return json_events(self.stage_logs[k])

    def stage_pid(self, k: int) -> int:
        return next(pid for pid in _children(self.proc.pid)
                    if f"--index\0{k}\0".encode() in Path(f"/proc/{pid}/cmdline").read_bytes())

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _stage_logs(pid: int) -> dict[int, Path]:
    """Each stage process's log file: beside the peers file the serve process wrote (LocalCluster)."""
    logs = {}
    for child in _children(pid):
        try:
            argv = Path(f"/proc/{child}/cmdline").read_bytes().decode().split("\0")
        except OSError:
            continue
        if "--peers" in argv and "--index" in argv:
            peers = Path(argv[argv.index("--peers") + 1])
            k = int(argv[argv.index("--index") + 1])
            logs[k] = peers.parent / f"stage-{k}.log"
    return logs


def start_server(tmp: Path, *extra: str) -> LiveServer:
    """A real `flowspec serve --local` process; `extra`: more flags."""
    require_model(SMOL)
    port = free_ports(1)[0]
    log = tmp / "serve.log"
    env = dict(os.environ, FLOWSPEC_LOG="info")  # the stages log request.open / request.closed
    cmd = [sys.executable, "-m", "flowspec", "serve", "--local", "--stages", str(STAGES), "--model", SMOL,
           "--draft", DRAFT, "--port", str(port), "--api-key", API_KEY, "--max-concurrent", str(MAX_CONCURRENT),
           "--max-body-bytes", str(MAX_BODY), *extra]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=ROOT)
    server = LiveServer(proc, port, log)
    deadline = time.monotonic() + 240
    while True:
        assert proc.poll() is None, f"flowspec serve exited with {proc.returncode}:\n{server.log_tail()}"
        try:
            if server.get("/health")[0] == 200:
                break
        except OSError:
            pass
        assert time.monotonic() < deadline, f"flowspec serve not up:\n{server.log_tail()}"
        time.sleep(0.5)
    server.stage_logs = _stage_logs(proc.pid)
    assert sorted(server.stage_logs) == list(range(1, STAGES + 1)), server.stage_logs
    return server


def stop_server(server: LiveServer) -> None:
    stages = _children(server.proc.pid)
    server.proc.send_signal(signal.SIGTERM)
    try:
        server.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait()
    for pid in stages:  # a serve process that died hard leaves its stage processes behind
        try:
            if b"flowspec.cli.node" in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    live = start_server(tmp_path_factory.mktemp("serve"))
    try:
        yield live
    finally:
        stop_server(live)
