"""Request lifecycle over real stage processes: a killed stage fails the request with a clear error naming it
(never a hang); a cancelled stream frees the request on every stage; `flowspec run --json` prints the documented
rows; peers-file errors are line-numbered and `flowspec-node` exits non-zero on a bad one; a bad `--layers` for
`flowspec run --local` is one error line naming the flag, and a random.py in its working folder does not reach
its stages."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flowspec.api import Cluster, Request
from flowspec.config import parse_peers
from flowspec.errors import ConfigError, StageFailed, StageTimeout
from flowspec.net import Timeouts
from flowspec.node.build import deployment
from flowspec.node.local import LocalCluster
from tests.e2e.conftest import ROOT, SMOL, Stages, log_events, start_sync

FAST = Timeouts(heartbeat_interval=0.2, heartbeat_timeout=1.0)


@pytest.mark.slow
@pytest.mark.parametrize("victim", [2, 1])
async def test_killed_stage_fails_the_request_naming_it(victim: int) -> None:
    deployment(SMOL, 2)
    local = LocalCluster(SMOL, 2, extra_args=["--heartbeat-timeout", "1"])
    try:
        start_sync(local)
        # no replacement comes: give up after 1 s
        cluster = await Cluster.connect(local.peers, model=SMOL, timeouts=FAST, step_timeout=5.0,
                                        recovery_timeout=1.0)
        got: list[int] = []
        try:
            with pytest.raises((StageFailed, StageTimeout)) as info:
                async with asyncio.timeout(20):
                    async for tokens in cluster.stream_tokens("Write a long story about a lighthouse.",
                                                              Request(mode="ar", max_new_tokens=400)):
                        got.extend(tokens)
                        if len(got) == 3:
                            local.kill_stage(victim)
                            killed_at = time.monotonic()
            elapsed = time.monotonic() - killed_at
            assert f"stage {victim}" in str(info.value), info.value
            assert elapsed < 1.0 + 5.0 + 2.0, elapsed  # recovery timeout + one step timeout + slack
            assert 3 <= len(got) < 400
        finally:
            await cluster.aclose()
    finally:
        local.stop()


@pytest.mark.parametrize("where", ["in __anext__", "in the loop body"])
async def test_cancelled_stream_frees_the_request(stages: Stages, head_for, where: str) -> None:  # type: ignore[no-untyped-def]
    n = 2
    local = stages.get(SMOL, n)
    since = [len(log_events(local, k)) for k in (1, 2)]
    async with head_for(n, draft="self:layers=20") as cluster:
        started = asyncio.Event()

        async def consume() -> None:
            async for _ in cluster.stream("Tell me about the history of Rome.", mode="flowspec",
                                          max_new_tokens=300):
                started.set()
                if where == "in the loop body":
                    await asyncio.sleep(30)  # the consumer is busy elsewhere when it is cancelled

        task = asyncio.create_task(consume())
        async with asyncio.timeout(60):
            await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        async with asyncio.timeout(10):
            while cluster.head.links.open_requests:  # the head's finally ran: nothing left of the request
                await asyncio.sleep(0.05)
        # every stage opened and then closed (not merely orphaned) exactly the request it was given
        for k in (1, 2):
            deadline = time.monotonic() + 5
            while True:
                events = log_events(local, k)[since[k - 1]:]
                opened = {e["req"] for e in events if e.get("event") == "request.open"}
                closed = {e["req"] for e in events if e.get("event") == "request.closed"}
                if opened and opened <= closed:
                    break
                assert time.monotonic() < deadline, f"stage {k}: opened {opened}, closed {closed}"
                await asyncio.sleep(0.05)
        # and the next request runs normally on the same head
        result = await cluster.generate("Hi", mode="flowspec", max_new_tokens=6)
        assert len(result.tokens) == 6 and result.finish_reason == "length"


def test_flowspec_run_json() -> None:
    cmd = [sys.executable, "-m", "flowspec", "run", "--local", "--stages", "2", "--model", SMOL, "--mode", "ar",
           "--prompt-file", str(ROOT / "data/specbench/qa.jsonl"), "--limit", "2", "--json",
           "--max-new-tokens", "8"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
    assert len(rows) == 2, out.stdout
    keys = {"id", "tokens", "text", "tokens_per_s", "ttft_s", "steps", "verifications", "mean_accepted",
            "tokens_per_step", "draft_tokens_per_token", "utilization", "bytes_per_token"}
    for row, qid in zip(rows, ("321", "322")):
        assert keys <= set(row), keys - set(row)
        assert row["id"] == qid and len(row["tokens"]) == 8 and row["text"] and row["tokens_per_s"] > 0
        assert len(row["utilization"]) == 2 and row["mean_accepted"] == 1.0


@pytest.mark.parametrize(("text", "where"), [
    ("127.0.0.1:7000\n127.0.0.1:7001\n# comment\n127.0.0.1:notaport\n", ":4: port must be"),
    ("127.0.0.1:7000\n\n127.0.0.1:7001 layers=x\n", ":3: layers must be a positive integer"),
    ("127.0.0.1:7000\n127.0.0.1:7001 colour=red\n", ":2: unknown option 'colour=red'"),
    ("127.0.0.1:7000\n127.0.0.1:7001\n127.0.0.1:7001  # again\n", ":3: 127.0.0.1:7001 is already stage line 2"),
    ("127.0.0.1:7000\nlocalhost:7001\n127.0.0.1:7001\n", ":3: 127.0.0.1:7001 is already stage line 2 .as localhost"),
    ("127.0.0.1:7000\n[::1]:7001\n[0:0::1]:7001\n", r":3: \[0:0::1\]:7001 is already stage line 2"),
    ("127.0.0.1:7000 layers=3\n127.0.0.1:7001\n", ":1: the head holds no target layers"),
    ("justahost\n127.0.0.1:7001\n", ":1: expected host:port"),
    ("# only a head\n127.0.0.1:7000\n", "needs at least two lines"),
])
def test_peers_errors_are_line_numbered(text: str, where: str) -> None:
    with pytest.raises(ConfigError, match=f"^peers.txt{where}" if where.startswith(":") else where):
        parse_peers(text, "peers.txt")


def test_ipv6_addresses_print_in_brackets() -> None:
    peers = parse_peers("[::1]:7000\n[::1]:7001\n127.0.0.1:7001\n")
    assert [p.address for p in peers.stages] == ["[::1]:7001", "127.0.0.1:7001"]


def test_flowspec_node_rejects_a_bad_peers_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    peers = tmp_path / "peers.txt"
    peers.write_text("127.0.0.1:7000\n127.0.0.1:7001\n127.0.0.1:99999\n")
    out = subprocess.run([str(ROOT / "bin/flowspec-node"), "--peers", str(peers), "--index", "1", "--model", SMOL],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert f"{peers}:3: port must be 1..65535" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    missing = subprocess.run([str(ROOT / "bin/flowspec-node"), "--peers", str(tmp_path / "nope.txt"), "--index",
                              "1", "--model", SMOL], capture_output=True, text=True, timeout=120)
    assert missing.returncode != 0 and "cannot read peers file" in missing.stderr, missing.stderr


@pytest.mark.slow
def test_run_local_ignores_modules_in_the_working_folder(tmp_path: Path) -> None:
    """`python -m` puts the working folder first on sys.path: a random.py there must not reach the stages."""
    script = Path(sys.executable).with_name("flowspec")  # the installed command: its sys.path[0] is its own folder
    if not script.is_file():
        pytest.skip("needs the installed `flowspec` command next to this interpreter")
    (tmp_path / "random.py").write_text("raise ImportError('the random.py of the working folder was imported')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    out = subprocess.run([str(script), "run", "--local", "--stages", "1", "--model", SMOL, "--mode", "ar",
                          "--prompt", "Hi", "--max-new-tokens", "3", "--json"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    [row] = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
    assert len(row["tokens"]) == 3, row


@pytest.mark.parametrize(("layers", "says"), [
    ("0,30", "argument --layers: '0,30': must be in 1..1048576, got 0"),  # refused as it is parsed
    ("30", "--stages 2 but --layers has 1 numbers; give one per stage"),
])
def test_run_local_names_the_layers_flag(layers: str, says: str) -> None:
    cmd = [sys.executable, "-m", "flowspec", "run", "--local", "--stages", "2", "--layers", layers, "--model", SMOL,
           "--prompt", "Hi", "--max-new-tokens", "2"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 2, out
    errors = [line for line in out.stderr.splitlines() if "error:" in line]  # after argparse's usage, if any
    assert errors == [f"flowspec run: error: {says}"], out.stderr
    assert "peers.txt" not in out.stderr and "/tmp" not in out.stderr and "Traceback" not in out.stderr


async def test_slow_drafter_load_keeps_the_links_up(stages: Stages, monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading the draft model on first use must not block the event loop past the heartbeat timeout (it did:
    every link dropped while a big drafter loaded, and the request went through a needless recovery)."""
    import flowspec.store

    real = flowspec.store.make_drafter

    def slow_make_drafter(*args, **kwargs):  # type: ignore[no-untyped-def]
        time.sleep(4.0)  # a big drafter on a busy CPU; the head's heartbeat timeout below is 3 s
        return real(*args, **kwargs)

    monkeypatch.setattr(flowspec.store, "make_drafter", slow_make_drafter)
    local = stages.get(SMOL, 2)
    # recovery_timeout=0: a lost stage would fail the request outright
    async with await Cluster.connect(local.peers, model=SMOL, draft="random", recovery_timeout=0,
                                     timeouts=Timeouts(heartbeat_interval=0.5, heartbeat_timeout=3.0)) as cluster:
        result = await cluster.generate("Hi", mode="flowspec", max_new_tokens=4)
        assert len(result.tokens) == 4 and result.recoveries == 0
        assert cluster.head.links.all_up
