"""`flowspec chaos`: a seeded fault schedule against a local SmolLM2 pipeline, and a reliability table.

Requests run one after another in every mode. Most use a head in this process (a fresh `Cluster.connect` per
request, so faults also land during connect); some use a head process (`flowspec run --peers --json`), so the
head itself can be killed or stopped. Each request gets one to three faults at random moments of its connect,
prefill or decode: a stage killed with SIGKILL and restarted after a while, a stage or the head stopped
(SIGSTOP) and continued, the head killed, or rarely a stage killed for longer than the recovery timeout (that
request must fail, clearly). Every completed request is compared with its fault-free run; a request that
neither completes nor fails within `--hang-s` counts as hung. At the end every stage's log must show each
request it opened freed again (closed, failed, orphaned by its head, or refused).

    flowspec chaos --faults 200 --seed 1 --out chaos-out
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from flowspec.api import Cluster, Request
from flowspec.cli import options
from flowspec.compat import TIMEOUT_ERRORS
from flowspec.errors import FlowSpecError
from flowspec.net import Timeouts
from flowspec.node.head import GenerationResult
from flowspec.node.local import LocalCluster, python_module

__all__ = ["ChaosConfig", "add_chaos_command", "run_chaos"]

MODEL = "smollm2-135m"
DRAFT = "self:layers=20"
PROMPTS = (
    "Explain in two sentences why pipelines help on slow devices.",
    "Write a Python function that reverses a string.",
    "What is the capital of France, and why is it famous?",
    "Give three tips for keeping a Raspberry Pi cool.",
)
MODES = ("ar", "chunk", "pipedec", "flowspec")
# fault kind -> weight; "-head" kinds need a head process
FAULT_WEIGHTS = {"kill-stage": 4, "stop-stage": 3, "kill-head": 1, "stop-head": 1, "kill-stage-long": 0.4}


@dataclass(frozen=True)
class ChaosConfig:
    faults: int = 200  # stop once at least this many faults were injected
    seed: int = 1
    stages: int = 3
    max_new_tokens: int = 24
    heartbeat_timeout: float = 3.0
    recovery_timeout: float = 15.0
    head_process_share: float = 0.3  # requests whose head is a `flowspec run` process (head faults possible)
    hang_s: float = 150.0  # neither done nor failed by then: hung
    cache_dir: str | None = None


@dataclass
class Fault:
    kind: str
    target: int  # 0 = the head, k = stage k
    at_s: float  # after the request started
    hold_s: float  # how long a stopped process stays stopped, or a killed stage stays down
    phase: str  # connect / prefill / decode (intended)


@dataclass
class Outcome:
    index: int
    mode: str
    prompt: int
    head: str  # "in-process" or "process"
    faults: list[Fault]
    result: str  # identical / different / failed / head-killed / hung
    reason: str = ""
    recoveries: int = 0
    seconds: float = 0.0
    longest_stall_s: float = 0.0  # longest wait for the next token (in-process heads)


@dataclass
class Report:
    config: ChaosConfig
    outcomes: list[Outcome] = field(default_factory=list)
    rss_before_mib: dict[int, float] = field(default_factory=dict)
    rss_after_mib: dict[int, float] = field(default_factory=dict)
    leaked: dict[int, list[int]] = field(default_factory=dict)  # stage -> request ids never freed there
    wall_s: float = 0.0

    def summary(self) -> dict[str, Any]:
        results = Counter(o.result for o in self.outcomes)
        faults = Counter(f.kind for o in self.outcomes for f in o.faults)
        reasons = Counter(o.reason for o in self.outcomes if o.result == "failed")
        return {
            "requests": len(self.outcomes), "faults": sum(faults.values()), "faults_by_kind": dict(faults),
            "identical": results["identical"], "different": results["different"], "failed": results["failed"],
            "failed_reasons": dict(reasons), "head_killed": results["head-killed"], "hung": results["hung"],
            "recoveries": sum(o.recoveries for o in self.outcomes),
            "longest_stall_s": round(max((o.longest_stall_s for o in self.outcomes), default=0.0), 2),
            "leaked_requests": sum(len(v) for v in self.leaked.values()),
            "rss_before_mib": self.rss_before_mib, "rss_after_mib": self.rss_after_mib,
            "wall_s": round(self.wall_s, 1),
        }


class Chaos:
    def __init__(self, config: ChaosConfig) -> None:
        self.config = config
        self.rng = random.Random(config.seed)
        self.local = LocalCluster(MODEL, config.stages, cache_dir=config.cache_dir,
                                  extra_args=["--heartbeat-timeout", repr(config.heartbeat_timeout)])
        self.timeouts = Timeouts.for_heartbeat(config.heartbeat_timeout)
        self.references: dict[tuple[str, int], list[int]] = {}
        self.durations: dict[str, float] = {}
        self.drafter: Any = None
        self.down: set[int] = set()  # stages killed and not restarted yet
        self.stopped: set[int] = set()  # stages under SIGSTOP
        self.timers: list[asyncio.TimerHandle] = []

    # -- the cluster ---------------------------------------------------------------------------------------
    async def start(self) -> None:
        os.environ["FLOWSPEC_LOG"] = "info"  # stage logs record request.open / freed: the leak check reads them
        await self.local.start()
        from flowspec.store import make_drafter

        self.drafter = await asyncio.to_thread(make_drafter, DRAFT, MODEL, self.config.cache_dir)

    async def heal(self) -> None:
        """Every stage running and listening again, before the next request."""
        for timer in self.timers:
            timer.cancel()
        self.timers.clear()
        for k in list(self.stopped):
            self._signal(k, signal.SIGCONT)
        self.stopped.clear()
        for k in sorted(self.down):
            if self.local.procs[k].poll() is not None:
                self.local.start_stage(k)
        for k in sorted(self.down):
            await self.local.wait_ready(k)
        self.down.clear()

    def _signal(self, k: int, sig: int) -> None:
        proc = self.local.procs[k]
        if proc.poll() is None:
            os.kill(proc.pid, sig)

    def rss_mib(self) -> dict[int, float]:
        out = {}
        for k, proc in self.local.procs.items():
            try:
                status = Path(f"/proc/{proc.pid}/status").read_text()
            except OSError:
                continue
            kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
            out[k] = round(kb / 1024, 1)
        return out

    # -- faults --------------------------------------------------------------------------------------------
    def plan(self, head_process: bool, expected_s: float, startup_s: float) -> list[Fault]:
        kinds = [k for k in FAULT_WEIGHTS if head_process or not k.endswith("-head")]
        faults = []
        for _ in range(self.rng.choice((1, 1, 2, 3))):
            kind = self.rng.choices(kinds, [FAULT_WEIGHTS[k] for k in kinds])[0]
            phase = self.rng.choice(("connect", "prefill", "decode", "decode"))
            at = startup_s + {"connect": self.rng.uniform(0.0, 0.3), "prefill": self.rng.uniform(0.3, 1.0),
                              "decode": self.rng.uniform(1.0, max(1.5, expected_s))}[phase]
            target = 0 if kind.endswith("-head") else self.rng.randint(1, self.config.stages)
            hold = (self.config.recovery_timeout + 3.0 if kind == "kill-stage-long"
                    else self.rng.uniform(0.3, 2.5 * self.config.heartbeat_timeout))
            faults.append(Fault(kind, target, round(at, 3), round(hold, 3), phase))
        return faults

    def schedule(self, faults: list[Fault], head: subprocess.Popen[bytes] | None) -> None:
        loop = asyncio.get_running_loop()
        for fault in faults:
            self.timers.append(loop.call_later(fault.at_s, self._inject, fault, head))

    def _inject(self, fault: Fault, head: subprocess.Popen[bytes] | None) -> None:
        loop = asyncio.get_running_loop()
        k = fault.target
        if fault.kind in ("kill-head", "stop-head"):
            if head is None or head.poll() is not None:
                return
            if fault.kind == "kill-head":
                os.kill(head.pid, signal.SIGKILL)
            else:
                os.kill(head.pid, signal.SIGSTOP)
                self.timers.append(loop.call_later(fault.hold_s, _continue, head))
            return
        if k in self.down:
            return
        if fault.kind == "stop-stage":
            if k not in self.stopped:
                self.stopped.add(k)
                self._signal(k, signal.SIGSTOP)
                self.timers.append(loop.call_later(fault.hold_s, self._cont, k))
            return
        self.stopped.discard(k)
        self._signal(k, signal.SIGKILL)
        self.down.add(k)
        self.timers.append(loop.call_later(fault.hold_s, self._restart, k))

    def _cont(self, k: int) -> None:
        if k in self.stopped:
            self.stopped.discard(k)
            self._signal(k, signal.SIGCONT)

    def _restart(self, k: int) -> None:
        if k in self.down and self.local.procs[k].poll() is not None:
            self.local.procs[k].wait()
            self.local.start_stage(k)  # `heal` waits for it to listen before the next request

    # -- requests ------------------------------------------------------------------------------------------
    async def in_process(self, mode: str, prompt: int) -> tuple[GenerationResult, float]:
        """One request on a fresh head here; returns the result and the longest wait for a token."""
        cluster = await Cluster.connect(self.local.peers, model=MODEL, cache_dir=self.config.cache_dir,
                                        timeouts=self.timeouts, recovery_timeout=self.config.recovery_timeout,
                                        step_timeout=30.0)
        if mode != "ar":
            cluster.head.drafter = self.drafter
        result = GenerationResult()
        last, stall = time.monotonic(), 0.0
        try:
            async for _ in cluster.stream_tokens(PROMPTS[prompt], Request(mode, self.config.max_new_tokens), result):
                now = time.monotonic()
                stall, last = max(stall, now - last), now
        finally:
            await cluster.aclose()
        return result, stall

    def head_command(self, mode: str, prompt: int) -> list[str]:
        cmd = [*python_module("flowspec"), "run", "--peers", str(self.local.peers_path), "--model", MODEL,
               "--mode", mode, "--prompt", PROMPTS[prompt], "--max-new-tokens", str(self.config.max_new_tokens),
               "--json", "--heartbeat-timeout", repr(self.config.heartbeat_timeout),
               "--recovery-timeout", repr(self.config.recovery_timeout)]
        if mode != "ar":
            cmd += ["--draft", DRAFT]
        if self.config.cache_dir:
            cmd += ["--cache-dir", self.config.cache_dir]
        return cmd

    async def reference(self, mode: str, prompt: int) -> list[int]:
        if (mode, prompt) not in self.references:
            started = time.monotonic()
            result, _ = await self.in_process(mode, prompt)
            self.durations[mode] = max(self.durations.get(mode, 0.0), time.monotonic() - started)
            self.references[(mode, prompt)] = result.tokens
        return self.references[(mode, prompt)]

    async def one(self, index: int, mode: str, prompt: int, head_process: bool) -> Outcome:
        reference = await self.reference(mode, prompt)
        startup = 4.0 if head_process else 0.0  # a head process imports torch and loads its drafter first
        faults = self.plan(head_process, self.durations[mode], startup)
        outcome = Outcome(index, mode, prompt, "process" if head_process else "in-process", faults, "hung")
        started = time.monotonic()
        try:
            if head_process:
                await self._via_process(outcome, reference)
            else:
                self.schedule(faults, None)
                try:
                    result, stall = await asyncio.wait_for(self.in_process(mode, prompt), self.config.hang_s)
                except FlowSpecError as exc:
                    outcome.result, outcome.reason = "failed", _reason(str(exc))
                else:
                    outcome.result = "identical" if result.tokens == reference else "different"
                    outcome.recoveries, outcome.longest_stall_s = result.recoveries, stall
        except TIMEOUT_ERRORS:  # wait_for's, and _via_process's own
            outcome.result = "hung"
        finally:
            outcome.seconds = round(time.monotonic() - started, 2)
            await self.heal()
        return outcome

    async def _via_process(self, outcome: Outcome, reference: list[int]) -> None:
        head = subprocess.Popen(self.head_command(outcome.mode, outcome.prompt), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True)
        self.schedule(outcome.faults, head)
        try:
            out, err = await asyncio.to_thread(head.communicate, timeout=self.config.hang_s)
        except subprocess.TimeoutExpired:
            raise TimeoutError from None
        finally:
            if head.poll() is None:
                os.kill(head.pid, signal.SIGCONT)
                head.kill()
                await asyncio.to_thread(head.communicate)
        if head.returncode == -signal.SIGKILL:
            outcome.result = "head-killed"
        elif head.returncode == 0:
            row = json.loads(out.decode().strip().splitlines()[-1])
            outcome.result = "identical" if row["tokens"] == reference else "different"
            outcome.recoveries = 0  # not reported by `flowspec run --json`
        else:
            outcome.result, outcome.reason = "failed", _reason(err.decode().strip().splitlines()[-1] if err else
                                                               f"exit code {head.returncode}")

    def leaks(self) -> dict[int, list[int]]:
        """Per stage: requests opened by its current process and never freed (closed/failed/orphaned/refused)."""
        out = {}
        for k, path in self.local.logs.items():
            opened: set[int] = set()
            for line in path.read_text(errors="replace").splitlines():
                if not line.startswith("{"):
                    continue
                try:
                    event = json.loads(line)
                except json.JSONDecodeError:
                    continue
                name = event.get("event")
                if name == "node.ready":
                    opened.clear()  # a restarted process: the killed one's requests died with it
                elif name == "request.open":
                    opened.add(event["req"])
                elif name in ("request.closed", "request.failed", "request.orphaned", "request.refused"):
                    opened.discard(event["req"])
            out[k] = sorted(opened)
        return out


def _continue(head: subprocess.Popen[bytes]) -> None:
    if head.poll() is None:
        os.kill(head.pid, signal.SIGCONT)


def _reason(text: str) -> str:
    """A failure's reason without the run-specific parts (addresses, seconds), for grouping."""
    import re

    text = re.sub(r"127\.0\.0\.1:\d+|\('127\.0\.0\.1', \d+\)", "ADDR", text)
    return re.sub(r"\d+(\.\d+)? s\b", "N s", text)[:200]


async def run_chaos(config: ChaosConfig, progress: bool = True) -> Report:
    chaos = Chaos(config)
    report = Report(config)
    started = time.monotonic()
    await chaos.start()
    try:
        for mode in MODES:  # fault-free runs first: the references, and how long each mode takes
            await chaos.reference(mode, 0)
        report.rss_before_mib = chaos.rss_mib()
        index = 0
        while sum(len(o.faults) for o in report.outcomes) < config.faults:
            mode = MODES[index % len(MODES)]
            prompt = chaos.rng.randrange(len(PROMPTS))
            head_process = chaos.rng.random() < config.head_process_share
            outcome = await chaos.one(index, mode, prompt, head_process)
            report.outcomes.append(outcome)
            if progress:
                kinds = ",".join(f"{f.kind}@{f.target}/{f.phase}" for f in outcome.faults)
                print(f"[{index:3d}] {mode:8s} {outcome.head:10s} {kinds:60s} -> {outcome.result} "
                      f"({outcome.seconds:.1f} s){' ' + outcome.reason if outcome.reason else ''}",
                      file=sys.stderr, flush=True)
            index += 1
        await asyncio.sleep(config.heartbeat_timeout + 1.0)  # a stage frees an abandoned request by then
        report.rss_after_mib = chaos.rss_mib()
        report.leaked = {k: v for k, v in chaos.leaks().items() if v}
    finally:
        await chaos.heal()
        chaos.local.stop()
    report.wall_s = time.monotonic() - started
    return report


def markdown(report: Report) -> str:
    s = report.summary()
    lines = [
        "| requests | faults | identical to fault-free | different | failed clearly | head killed | lost or hung "
        "| recoveries (in-process heads) | longest stall | requests leaked on stages |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| {s['requests']} | {s['faults']} | {s['identical']} | {s['different']} | {s['failed']} | "
        f"{s['head_killed']} | {s['hung']} | {s['recoveries']} | {s['longest_stall_s']} s | {s['leaked_requests']} |",
        "",
        "Faults by kind: " + ", ".join(f"{k} {v}" for k, v in sorted(s["faults_by_kind"].items())) + ".",
        "Failures: " + ("; ".join(f"{v} × {k}" for k, v in s["failed_reasons"].items()) or "none") + ".",
        "Stage RSS (MiB) before / after: " + ", ".join(
            f"V{k} {s['rss_before_mib'].get(k, '?')} / {s['rss_after_mib'].get(k, '?')}"
            for k in sorted(s["rss_before_mib"])) + f". Wall {s['wall_s']} s.",
    ]
    return "\n".join(lines) + "\n"


def add_chaos_command(sub: Any) -> None:
    p = sub.add_parser("chaos", help="inject a seeded series of faults into a local pipeline and count outcomes",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--faults", type=options.positive_int, default=200,
                   help="inject at least this many faults (default 200)")
    p.add_argument("--seed", type=options.seed, default=1, help="the fault schedule's seed (default 1)")
    p.add_argument("--stages", type=options.stage_count, default=3, help="local SmolLM2 stage processes (default 3)")
    p.add_argument("--max-new-tokens", type=options.positive_int, default=24)
    p.add_argument("--heartbeat-timeout", type=options.duration, default=3.0,
                   help="seconds of silence before a stage is declared dead (default 3)")
    p.add_argument("--recovery-timeout", type=options.wait_duration, default=15.0,
                   help="seconds to wait for a lost stage before its request fails (default 15)")
    p.add_argument("--out", help="folder for chaos.json and chaos.md")
    p.add_argument("--cache-dir", help="model cache (default $FLOWSPEC_CACHE or ~/.cache/flowspec)")
    p.set_defaults(handler=chaos_command)


def chaos_command(args: argparse.Namespace) -> int:
    config = ChaosConfig(faults=args.faults, seed=args.seed, stages=args.stages,
                         max_new_tokens=args.max_new_tokens, heartbeat_timeout=args.heartbeat_timeout,
                         recovery_timeout=args.recovery_timeout, cache_dir=args.cache_dir)
    report = asyncio.run(run_chaos(config))
    table = markdown(report)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "chaos.md").write_text(table)
        (out / "chaos.json").write_text(json.dumps({"summary": report.summary(), "config": asdict(config),
                                                    "outcomes": [asdict(o) for o in report.outcomes]}, indent=1))
    s = report.summary()
    return 0 if s["hung"] == 0 and s["different"] == 0 and s["leaked_requests"] == 0 else 1
