"""A local cluster: N `flowspec-node` processes on loopback, for `flowspec run --local` and tests.

The stage processes never outlive this one: `stop()` (or the context manager) ends them; so does a finalizer when
the cluster is garbage-collected or the interpreter exits without `stop()`; and when this process dies without
running any Python (SIGKILL, `os._exit`), each stage sees its lifeline close and stops itself
(flowspec.node.lifeline). Its folder (peers file, stage logs) goes with it too; one left behind by a launcher that
was SIGKILLed is removed by the next cluster started on this machine (the folder's name carries its launcher's pid).

Stages run their module the way `python -m` does, but without the working folder on `sys.path` (`python_module`):
a `random.py`, or any other standard library name, in the folder `flowspec run --local` was started from would
otherwise shadow the real module in every stage.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path

from flowspec.bounds import MAX_STAGES, check
from flowspec.config import Peers, read_peers
from flowspec.errors import StageFailed
from flowspec.node.lifeline import Lifeline
from flowspec.store.shard import check_layer_counts

__all__ = ["LocalCluster", "free_ports", "python_module", "remove_stale_folders"]

_FOLDER_PREFIX = "flowspec-local-"  # then the launcher's pid, a dash, and tempfile's random part

# `python -m` puts the working folder first on sys.path; this drops it, then runs the module as -m would. Python
# 3.11 has -P for that, 3.10 (JetPack 6) does not. PYTHONPATH entries stay, ahead of site-packages, so a checkout
# named there is still the one that runs.
_RUN_MODULE = """import sys
if sys.path and sys.path[0] == "":
    del sys.path[0]
import runpy
runpy.run_module(sys.argv.pop(1), run_name="__main__", alter_sys=True)"""


def python_module(module: str) -> list[str]:
    """The command that runs `python -m MODULE` in this interpreter, without the working folder on sys.path."""
    return [sys.executable, "-c", _RUN_MODULE, module]


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class LocalCluster:
    """Start stage processes; `peers` describes them; `stop()` (or the context manager) ends them.

    Start stages from a thread that outlives them (the event loop's): on Linux a stage also stops when the
    thread that started it exits (see flowspec.node.lifeline)."""

    def __init__(self, model: str, num_stages: int, layers: list[int] | None = None,
                 cache_dir: str | None = None, secret: bytes | None = None, extra_args: list[str] | None = None,
                 threads: int = 1, module: str = "flowspec.cli.node") -> None:
        """`module` is the stage program (`python -m MODULE`) taking flowspec-node's options, then `extra_args`;
        the emulated testbed passes its own (flowspec.bench.node)."""
        check(num_stages, "--stages", 1, MAX_STAGES, whole=True)
        if layers is not None:  # here, before they reach the peers file this writes (its errors name that file)
            check_layer_counts(layers, num_stages)
        self.model, self.num_stages, self.cache_dir = model, num_stages, cache_dir
        self.secret, self.extra_args, self.threads, self.module = secret, extra_args or [], threads, module
        remove_stale_folders()
        self._dir = tempfile.TemporaryDirectory(prefix=f"{_FOLDER_PREFIX}{os.getpid()}-")
        ports = free_ports(num_stages + 1)
        lines = [f"127.0.0.1:{ports[0]}  # head (this process)"]
        for k in range(1, num_stages + 1):
            option = f"  layers={layers[k - 1]}" if layers else ""
            lines.append(f"127.0.0.1:{ports[k]}{option}")
        self.peers_path = Path(self._dir.name) / "peers.txt"
        self.peers_path.write_text("\n".join(lines) + "\n")
        self.peers: Peers = read_peers(self.peers_path)
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.logs: dict[int, Path] = {}
        self._lifeline = Lifeline()
        # stop() runs it; so does the garbage collector, or the interpreter's exit, if nobody called stop()
        self._finalizer = weakref.finalize(self, _stop, self.procs, self._lifeline, self._dir)

    def command(self, index: int) -> list[str]:
        cmd = [*python_module(self.module), "--peers", str(self.peers_path), "--index", str(index),
               "--model", self.model, "--threads", str(self.threads), *self.extra_args]
        if self.cache_dir:
            cmd += ["--cache-dir", self.cache_dir]
        return cmd

    def start_stage(self, index: int) -> None:
        env = dict(os.environ)
        if self.secret:
            env["FLOWSPEC_SECRET"] = self.secret.decode()
        log = Path(self._dir.name) / f"stage-{index}.log"
        self.logs[index] = log
        with open(log, "ab") as out:
            # its own session: a Ctrl-C meant for this process does not reach the stage before stop() does
            self.procs[index] = subprocess.Popen([*self.command(index), *self._lifeline.args()],
                                                 stdin=self._lifeline.stdin, stdout=out, stderr=subprocess.STDOUT,
                                                 env=env, start_new_session=True)

    async def start(self, timeout_s: float = 120.0) -> None:
        for k in range(1, self.num_stages + 1):
            self.start_stage(k)
        await asyncio.gather(*(self.wait_ready(k, timeout_s) for k in range(1, self.num_stages + 1)))

    async def wait_ready(self, index: int, timeout_s: float = 120.0) -> None:
        peer = self.peers.stage(index)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            proc = self.procs[index]
            if proc.poll() is not None:
                raise StageFailed(f"stage {index} exited with code {proc.returncode}:\n{self.log_tail(index)}")
            try:
                _, writer = await asyncio.open_connection(peer.host, peer.port)
                writer.close()
                return
            except OSError:
                await asyncio.sleep(0.1)
        raise StageFailed(f"stage {index} did not start listening within {timeout_s:.0f} s:\n"
                          f"{self.log_tail(index)}")

    def log_tail(self, index: int, lines: int = 20) -> str:
        path = self.logs.get(index)
        if path is None or not path.exists():
            return "(no log)"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def kill_stage(self, index: int, sig: int = 9) -> None:
        proc = self.procs[index]
        if proc.poll() is None:
            os.kill(proc.pid, sig)
            if sig == 9:
                proc.wait(timeout=10)

    def stop(self) -> None:
        """End every stage process (SIGTERM, SIGKILL after 10 s) and remove the peers file and logs (idempotent)."""
        self._finalizer()

    async def __aenter__(self) -> LocalCluster:
        try:
            await self.start()
        except BaseException:
            self.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop()


def remove_stale_folders(parent: str | None = None) -> list[Path]:
    """Remove the folders (in `parent`, default the temp folder) that clusters of this user left behind when their
    launcher died without running Python (SIGKILL): those whose launcher pid, in the name, no longer runs. A
    folder whose pid was reused by another process is kept, as is any that is not this user's. Returns them."""
    if os.name != "posix":
        return []
    removed = []
    for path in Path(parent or tempfile.gettempdir()).glob(f"{_FOLDER_PREFIX}*-*"):
        pid = path.name[len(_FOLDER_PREFIX):].split("-", 1)[0]
        try:
            mine = path.lstat().st_uid == os.getuid() and path.is_dir() and not path.is_symlink()
        except OSError:
            continue
        if mine and pid.isdigit() and not _running(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _stop(procs: dict[int, subprocess.Popen[bytes]], lifeline: Lifeline,
          folder: tempfile.TemporaryDirectory[str]) -> None:
    """LocalCluster.stop, also its finalizer: so it must not refer to the cluster."""
    for proc in procs.values():
        if proc.poll() is None:
            proc.terminate()
    for proc in procs.values():
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    lifeline.close()
    folder.cleanup()
