"""Shared pieces of the end-to-end tests: stage processes on loopback (started once per stage count and
reused by every test through fresh heads), drafters loaded once, and transformers' greedy reference."""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

from flowspec.api import Cluster
from flowspec.model import Drafter
from flowspec.node.build import deployment
from flowspec.node.local import LocalCluster
from flowspec.store import make_drafter
from flowspec.store.pull import pull
from flowspec.store.registry import RECEIPT, model_dir
from tests.jsonlog import json_events

ROOT = Path(__file__).resolve().parents[2]
SPECBENCH = ROOT / "data" / "specbench"
SMOL = "smollm2-135m"


def specbench_prompts(names: tuple[str, ...] = ("mt_bench", "qa", "humaneval")) -> list[str]:
    """The first turn of the first line of each named Spec-Bench file."""
    out = []
    for name in names:
        line = (SPECBENCH / f"{name}.jsonl").read_text().splitlines()[0]
        out.append(json.loads(line)["turns"][0])
    return out


def require_model(name: str) -> None:
    if not (model_dir(name) / RECEIPT).is_file():
        if name.startswith("qwen") and not os.environ.get("FLOWSPEC_PULL_QWEN"):
            pytest.skip(f"{name} is not pulled (flowspec models pull {name})")
        pull(name)


def start_sync(local: LocalCluster, timeout_s: float = 120.0) -> None:
    """LocalCluster.start without an event loop (callable from inside a running test loop)."""
    for k in range(1, local.num_stages + 1):
        local.start_stage(k)
    deadline = time.monotonic() + timeout_s
    for k in range(1, local.num_stages + 1):
        peer = local.peers.stage(k)
        while True:
            proc = local.procs[k]
            assert proc.poll() is None, f"stage {k} exited with {proc.returncode}:\n{local.log_tail(k)}"
            try:
                socket.create_connection((peer.host, peer.port), timeout=1.0).close()
                break
            except OSError:
                assert time.monotonic() < deadline, f"stage {k} not listening:\n{local.log_tail(k)}"
                time.sleep(0.05)


class Stages:
    """Stage processes per (model, stage count), started on first use, stopped at the end of the session."""

    def __init__(self) -> None:
        self.clusters: dict[tuple[str, int], LocalCluster] = {}

    def get(self, model: str, n: int) -> LocalCluster:
        key = (model, n)
        if key not in self.clusters:
            require_model(model)
            deployment(model, n)  # split once here, not in n racing processes
            local = LocalCluster(model, n)
            old = os.environ.get("FLOWSPEC_LOG")
            os.environ["FLOWSPEC_LOG"] = "info"  # stage logs record request.open/closed: some tests read them
            try:
                start_sync(local)
            except BaseException:
                local.stop()
                raise
            finally:
                if old is None:
                    os.environ.pop("FLOWSPEC_LOG", None)
                else:
                    os.environ["FLOWSPEC_LOG"] = old
            self.clusters[key] = local
        local = self.clusters[key]
        dead = [k for k, p in local.procs.items() if p.poll() is not None]
        assert not dead, f"stage processes {dead} of {key} died:\n{local.log_tail(dead[0])}"
        return local

    def release(self, model: str, n: int) -> None:
        """Stop one cluster early (big models: free their memory for the rest of the session)."""
        local = self.clusters.pop((model, n), None)
        if local is not None:
            local.stop()

    def stop(self) -> None:
        for local in self.clusters.values():
            local.stop()


@pytest.fixture(scope="session")
def stages() -> Iterator[Stages]:
    s = Stages()
    yield s
    s.stop()


@pytest.fixture(scope="session")
def drafters() -> Callable[[str, str], Drafter]:
    cache: dict[tuple[str, str], Drafter] = {}

    def get(spec: str, model: str = SMOL) -> Drafter:
        if (spec, model) not in cache:
            cache[(spec, model)] = make_drafter(spec, model)
        return cache[(spec, model)]

    return get


@pytest.fixture(scope="session")
def head_for(stages: Stages, drafters: Callable[[str, str], Drafter]):  # type: ignore[no-untyped-def]
    """`async with head_for(n, draft=...) as cluster`: a fresh head (this test's loop) on shared stages."""

    @asynccontextmanager
    async def make(n: int, draft: str | None = None, model: str = SMOL, **kw: Any) -> AsyncIterator[Cluster]:
        local = stages.get(model, n)
        kw.setdefault("step_timeout", 30.0)  # a hang fails in 30 s, not 60
        cluster = await Cluster.connect(local.peers, model=model, draft=draft, **kw)
        if draft is not None:
            cluster.head.drafter = drafters(draft, model)
        try:
            yield cluster
        finally:
            await cluster.aclose()  # waits for a running draft job: drafters are shared between heads

    return make


class Reference:
    """transformers' own generate(do_sample=False) on the unsplit model, cached per prompt."""

    def __init__(self, model: str) -> None:
        from flowspec.store import load_hf_reference

        self.model = load_hf_reference(model)
        self.cache: dict[tuple[tuple[int, ...], int], list[int]] = {}

    def greedy(self, prompt: list[int], n: int) -> list[int]:
        key = (tuple(prompt), n)
        if key not in self.cache:
            ids = torch.tensor([prompt])
            with torch.no_grad():
                out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                          do_sample=False)
            self.cache[key] = out[0, len(prompt):].tolist()
        return self.cache[key]

    def logits(self, tokens: list[int]) -> torch.Tensor:
        """Next-token logits after every position of `tokens`, [len, V] float32."""
        with torch.no_grad():
            return self.model(torch.tensor([tokens])).logits[0].float()


@pytest.fixture(scope="session")
def smol_ref() -> Reference:
    require_model(SMOL)
    return Reference(SMOL)


def log_events(local: LocalCluster, index: int) -> list[dict[str, Any]]:
    """The JSON log lines of one stage process (stderr is a file: structlog's JSON renderer)."""
    return json_events(local.logs[index])
