"""Nothing is left behind. Local stage processes end with whatever started them, however it ends: `flowspec run
--local` sent SIGTERM or SIGKILL, an app that used `Cluster.start_local` and exited without `aclose()` (normally
or by os._exit); each half of a stage's lifeline (its stdin pipe, Linux's parent-death signal) works alone. And a
stage whose head vanished (SIGKILLed, or SIGSTOPped: its TCP connection silent but open) frees that head's
requests within its heartbeat timeout. The folder of a SIGKILLed launcher (peers file, stage logs) is removed by
the next cluster started.

Stage processes are found by their command line (`--parent-pid` names the launcher), so a failing test still
kills what it started, and processes of other runs on this machine are never touched."""

from __future__ import annotations

import asyncio
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from flowspec.cli import Interrupts
from flowspec.node.build import deployment
from flowspec.node.local import LocalCluster
from flowspec.store.pull import pull
from flowspec.store.registry import RECEIPT, model_dir
from tests.faults.conftest import SMOL, log_events, wait_listening

ROOT = Path(__file__).resolve().parents[2]
HEARTBEAT = 2.0  # the stages' --heartbeat-timeout in the vanished-head tests
GONE_WITHIN = 10.0  # seconds after the launcher's end by which no stage may be left

pytestmark = pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="finds processes through /proc")


# -- finding and cleaning up processes -----------------------------------------------------------------------
def _cmdline(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return []


def _is_stage_of(pid: int, parent: int) -> bool:
    args = _cmdline(pid)
    return (any(a.startswith(b"flowspec.") and a.endswith(b".node") for a in args)
            and any(a == b"--parent-pid" and b == str(parent).encode() for a, b in zip(args, args[1:])))


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def stage_pids(parent: int) -> list[int]:
    """The running stage processes that `parent` started (their command line names it as --parent-pid)."""
    pids = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]
    return sorted(pid for pid in pids if _is_stage_of(pid, parent) and _running(pid))


def still_running(pids: list[int], parent: int, within: float) -> list[int]:
    """Those of `pids` (stages of `parent`) still running after up to `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        left = [pid for pid in pids if _running(pid) and _is_stage_of(pid, parent)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def kill_left(proc: subprocess.Popen[bytes] | None, parent: int | None, known: list[int]) -> None:
    """SIGKILL `proc` and every stage it started that still runs (`known`: found while it was alive)."""
    if proc is not None:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()
    if parent is None:
        return
    for pid in sorted({*known, *stage_pids(parent)}):
        if _is_stage_of(pid, parent):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def child_env(**extra: str) -> dict[str, str]:
    """This checkout first on the path (stage processes inherit it)."""
    env = dict(os.environ, **extra)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def read_until(proc: subprocess.Popen[bytes], want: bytes, timeout_s: float, err: Path) -> bytes:
    """Read `proc`'s stdout until `want` appears in it."""
    assert proc.stdout is not None
    got = b""
    deadline = time.monotonic() + timeout_s
    while want not in got:
        assert proc.poll() is None, f"exited with {proc.returncode}; stdout {got!r}:\n{err.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {want!r} within {timeout_s} s; stdout {got!r}:\n" \
                                            f"{err.read_text()[-3000:]}"
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if ready:
            got += os.read(proc.stdout.fileno(), 4096)
    return got


@pytest.fixture(scope="module")
def smol() -> None:
    if not (model_dir(SMOL) / RECEIPT).is_file():
        pull(SMOL)
    deployment(SMOL, 2)  # split once here, not in racing stage processes
    deployment(SMOL, 1)


# -- flowspec run --local ------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_killed_run_local_leaves_no_stage(smol: None, tmp_path: Path, sig: signal.Signals) -> None:
    cmd = [sys.executable, "-m", "flowspec", "run", "--local", "--stages", "2", "--model", SMOL, "--mode", "ar",
           "--raw", "--prompt", "Once upon a time", "--max-new-tokens", "2000"]
    err = tmp_path / "run.err"
    proc, stages = None, []
    try:
        with open(err, "wb") as errors:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errors, env=child_env(),
                                    start_new_session=True)
        read_until(proc, b" ", 300, err)  # the stages are up and text is streaming
        stages = stage_pids(proc.pid)
        assert len(stages) == 2, stages
        proc.send_signal(sig)
        assert still_running(stages, proc.pid, GONE_WITHIN) == []
        code = proc.wait(timeout=10)
        assert code == (128 + signal.SIGTERM if sig == signal.SIGTERM else -signal.SIGKILL), err.read_text()[-3000:]
    finally:
        kill_left(proc, proc.pid if proc else None, stages)


# -- an app using Cluster.start_local -------------------------------------------------------------------------
APP = """
import asyncio, os, sys
from flowspec.api import Cluster

async def main() -> None:
    cluster = await Cluster.start_local("smollm2-135m", 2)
    result = await cluster.generate("Hi", mode="ar", max_new_tokens=4)
    print("generated", len(result.tokens), flush=True)
    sys.stdin.readline()  # the test has found the stages
    if sys.argv[1] == "os._exit":
        os._exit(0)
    # "return": leave without cluster.aclose()

asyncio.run(main())
"""


@pytest.mark.slow
@pytest.mark.parametrize("how", ["return", "os._exit"])
def test_app_exiting_without_aclose_leaves_no_stage(smol: None, tmp_path: Path, how: str) -> None:
    err = tmp_path / "app.err"
    proc, stages = None, []
    try:
        with open(err, "wb") as errors:
            proc = subprocess.Popen([sys.executable, "-c", APP, how], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=errors, env=child_env(), start_new_session=True)
        read_until(proc, b"generated", 300, err)
        stages = stage_pids(proc.pid)
        assert len(stages) == 2, stages
        assert proc.stdin is not None
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
        assert proc.wait(timeout=30) == 0, err.read_text()[-3000:]
        # on a normal exit the cluster's finalizer stopped them before the interpreter ended; after os._exit
        # each stage stops itself once its lifeline closes
        assert still_running(stages, proc.pid, 0.0 if how == "return" else GONE_WITHIN) == []
    finally:
        kill_left(proc, proc.pid if proc else None, stages)


# -- the cluster's folder ------------------------------------------------------------------------------------
HOLD_A_CLUSTER = """
import sys, time
from flowspec.node.local import LocalCluster

local = LocalCluster("smollm2-135m", 1)
print(local.peers_path.parent, flush=True)
time.sleep(600)
"""


def test_a_sigkilled_launchers_folder_is_removed_by_the_next_cluster(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # this test's clusters keep their folders here
    env = child_env(TMPDIR=str(tmp_path))
    procs = [subprocess.Popen([sys.executable, "-c", HOLD_A_CLUSTER], stdout=subprocess.PIPE, env=env,
                              start_new_session=True) for _ in range(2)]
    try:
        folders = []
        for proc in procs:
            assert proc.stdout is not None
            folders.append(Path(proc.stdout.readline().decode().strip()))
        killed, alive = folders
        assert killed.parent == tmp_path and (killed / "peers.txt").is_file() and (alive / "peers.txt").is_file()
        procs[0].kill()
        procs[0].wait(timeout=10)
        assert (killed / "peers.txt").is_file()  # SIGKILL: no finalizer ran
        other = tmp_path / "flowspec-local-x1y2z3"  # not named by a launcher's pid: nobody knows whose
        other.mkdir()
        local = LocalCluster(SMOL, 1)
        try:
            assert not killed.exists(), "the SIGKILLed launcher's folder is still there"
            assert (alive / "peers.txt").is_file() and other.is_dir()  # a running launcher's is kept
            assert local.peers_path.parent.name.startswith(f"flowspec-local-{os.getpid()}-")
        finally:
            local.stop()
        assert not local.peers_path.parent.exists()
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(timeout=10)
            if proc.stdout is not None:
                proc.stdout.close()


# -- each half of the lifeline alone ---------------------------------------------------------------------------
def test_a_stage_whose_launcher_is_already_gone_does_not_start(tmp_path: Path) -> None:
    peers = tmp_path / "peers.txt"
    peers.write_text("127.0.0.1:7000  # head\n127.0.0.1:7001\n")
    not_my_parent = os.getpid() + 1  # its parent is this process: any other pid means "the launcher is gone"
    cmd = [sys.executable, "-m", "flowspec.cli.node", "--peers", str(peers), "--index", "1",
           "--model", str(tmp_path / "no-such-model"), "--parent-pid", str(not_my_parent)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), timeout=120)
    assert out.returncode == 1, out
    assert "node.stopping" in out.stderr and "exited before this stage started" in out.stderr, out.stderr


@pytest.mark.slow
def test_a_stage_stops_when_its_stdin_pipe_closes(smol: None) -> None:
    local = LocalCluster(SMOL, 1)
    read_end, write_end = os.pipe()
    proc = None
    try:
        cmd = [*local.command(1), "--parent-pid", str(os.getpid())]  # this process stays alive: no SIGTERM
        with open(local.peers_path.parent / "stage-1.log", "wb") as out:
            proc = subprocess.Popen(cmd, stdin=read_end, stdout=out, stderr=subprocess.STDOUT, env=child_env(),
                                    start_new_session=True)
        os.close(read_end)
        log = local.peers_path.parent / "stage-1.log"
        peer = local.peers.stage(1)
        wait_listening(peer.host, peer.port, proc, "stage 1", log)
        os.close(write_end)
        write_end = -1
        assert proc.wait(timeout=GONE_WITHIN) == 0, log.read_text()[-3000:]
        stopping = [e for e in log_events(log) if e.get("event") == "node.stopping"]
        assert len(stopping) == 1 and "its pipe closed" in stopping[0]["reason"], stopping
        assert stopping[0]["level"] == "warning"
        with pytest.raises(OSError):  # its port is free: nobody answers there
            socket.create_connection((peer.host, peer.port), timeout=1.0).close()
    finally:
        if write_end >= 0:
            os.close(write_end)
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        local.stop()


MIDDLE = """
import os, subprocess, sys
read_end, write_end = os.pipe()
# the stage holds the write end of its own lifeline: its stdin never closes, only the parent-death signal is left
proc = subprocess.Popen([*sys.argv[1:], "--parent-pid", str(os.getpid())], stdin=read_end, pass_fds=(write_end,),
                        start_new_session=True)
print("started", proc.pid, flush=True)
proc.wait()
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_stage_stops_on_the_parent_death_signal_alone(smol: None, tmp_path: Path) -> None:
    local = LocalCluster(SMOL, 1)
    err = tmp_path / "middle.err"
    proc, stages = None, []
    try:
        with open(err, "wb") as errors:
            proc = subprocess.Popen([sys.executable, "-c", MIDDLE, *local.command(1)], stdout=subprocess.PIPE,
                                    stderr=errors, env=child_env(), start_new_session=True)
        peer = local.peers.stage(1)
        deadline = time.monotonic() + 300
        while True:  # until the stage listens
            assert proc.poll() is None and time.monotonic() < deadline, err.read_text()[-3000:]
            stages = stage_pids(proc.pid)
            try:
                socket.create_connection((peer.host, peer.port), timeout=1.0).close()
                break
            except OSError:
                time.sleep(0.2)
        assert len(stages) == 1, stages
        proc.kill()
        assert still_running(stages, proc.pid, GONE_WITHIN) == []
        stopping = [line for line in err.read_text().splitlines() if "node.stopping" in line]
        assert len(stopping) == 1 and "exited: SIGTERM" in stopping[0], err.read_text()[-3000:]
    finally:
        kill_left(proc, proc.pid if proc else None, stages)
        local.stop()


# -- SIGTERM and SIGHUP of a flowspec command go the way of Ctrl-C --------------------------------------------
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_sigterm_and_sighup_end_a_command_like_ctrl_c(sig: signal.Signals) -> None:
    if signal.getsignal(sig) is signal.SIG_IGN:
        pytest.skip(f"{sig.name} is ignored here (nohup): the command keeps ignoring it")
    cleaned: list[type[BaseException] | None] = []

    class Resource:  # a Cluster, say
        async def __aenter__(self) -> Resource:
            return self

        async def __aexit__(self, kind: type[BaseException] | None, *exc: object) -> None:
            await asyncio.sleep(0.01)  # cleanup may await
            cleaned.append(kind)

    async def command() -> None:
        async with Resource():
            os.kill(os.getpid(), sig)
            await asyncio.sleep(30)

    before = signal.getsignal(sig)
    with Interrupts() as interrupts:
        with pytest.raises(KeyboardInterrupt):
            asyncio.run(command())
    # 3.11+: asyncio.run's SIGINT handler cancels the main task; 3.10: KeyboardInterrupt unwinds it, as Ctrl-C does
    assert cleaned == [asyncio.CancelledError if sys.version_info >= (3, 11) else KeyboardInterrupt]
    assert interrupts.signum == sig
    assert signal.getsignal(sig) is before  # restored


def test_an_ignored_sighup_stays_ignored() -> None:
    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with Interrupts():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    finally:
        signal.signal(signal.SIGHUP, before)


# -- a stage whose head vanished ------------------------------------------------------------------------------
HEAD = """
import asyncio, sys
from flowspec.api import Cluster, Request
from flowspec.net import Timeouts

async def main() -> None:
    timeouts = Timeouts(heartbeat_interval=0.5, heartbeat_timeout=float(sys.argv[2]))
    cluster = await Cluster.connect(sys.argv[1], model="smollm2-135m", timeouts=timeouts)
    async for tokens in cluster.stream_tokens("Once upon a time", Request(mode="ar", max_new_tokens=2000),
                                              chat=False):
        print("tokens", len(tokens), flush=True)

asyncio.run(main())
"""


@pytest.fixture(scope="module")
def two_stages(smol: None) -> Iterator[LocalCluster]:
    """Two stages with a short heartbeat timeout, whose head is another process (as with stages started by hand)."""
    old = os.environ.get("FLOWSPEC_LOG")
    os.environ["FLOWSPEC_LOG"] = "info"  # request.open / request.orphaned are info and warning
    local = LocalCluster(SMOL, 2, extra_args=["--heartbeat-timeout", str(HEARTBEAT)])
    try:
        asyncio.run(local.start())
        yield local
    finally:
        local.stop()
        if old is None:
            os.environ.pop("FLOWSPEC_LOG", None)
        else:
            os.environ["FLOWSPEC_LOG"] = old


@pytest.mark.slow
@pytest.mark.parametrize("how", [signal.SIGSTOP, signal.SIGKILL], ids=["SIGSTOP", "SIGKILL"])
def test_a_stage_frees_the_requests_of_a_vanished_head(two_stages: LocalCluster, tmp_path: Path,
                                                       how: signal.Signals) -> None:
    local = two_stages
    since = {k: len(log_events(local.logs[k])) for k in (1, 2)}
    err = tmp_path / "head.err"
    proc = None
    try:
        with open(err, "wb") as errors:
            proc = subprocess.Popen([sys.executable, "-c", HEAD, str(local.peers_path), str(HEARTBEAT)],
                                    stdout=subprocess.PIPE, stderr=errors, env=child_env(), start_new_session=True)
        read_until(proc, b"tokens", 300, err)
        opened = {k: {e["req"] for e in log_events(local.logs[k])[since[k]:] if e["event"] == "request.open"}
                  for k in (1, 2)}
        assert len(opened[1]) == 1 and opened[1] == opened[2], opened
        os.kill(proc.pid, how)
        vanished = time.monotonic()
        open_now = opened
        while any(open_now.values()) and time.monotonic() - vanished < HEARTBEAT + 10:
            time.sleep(0.1)
            open_now = {k: _still_open(local, k, since[k]) for k in (1, 2)}
        took = time.monotonic() - vanished
        print(f"\n[faults] head {how.name}: both stages freed its request {took:.2f} s later")
        assert open_now == {1: set(), 2: set()}
        assert took < HEARTBEAT + 3.0  # the heartbeat timeout, plus a busy machine's slack
        for k in (1, 2):
            freed = [e for e in log_events(local.logs[k])[since[k]:] if e["event"] == "request.orphaned"]
            assert [e["req"] for e in freed] == list(opened[k]), freed
        assert all(p.poll() is None for p in local.procs.values())  # the stages serve on
    finally:
        kill_left(proc, None, [])  # a stopped process dies too


def _still_open(local: LocalCluster, index: int, since: int) -> set[int]:
    """Requests opened on stage `index` (after log line `since`) and not yet closed, failed or orphaned."""
    opened: set[int] = set()
    for e in log_events(local.logs[index])[since:]:
        if e["event"] == "request.open":
            opened.add(e["req"])
        elif e["event"] in ("request.closed", "request.failed", "request.orphaned"):
            opened.discard(e["req"])
    return opened
