"""The library surface for async apps.

    from flowspec.api import Cluster

    async with await Cluster.start_local("smollm2-135m", stages=3) as cluster:
        async for text in cluster.stream("Write a haiku about pipelines.", mode="flowspec"):
            print(text, end="", flush=True)

`Cluster.connect("peers.txt", model=...)` does the same against running `flowspec-node` processes.
Cancelling the consumer (or breaking out of the loop) cancels the request on every stage and frees its state.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncGenerator, Callable, Iterator, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from flowspec.compat import BaseExceptionGroup, add_note, shielded
from flowspec.config import ClusterConfig, Peers, load_secret, read_peers
from flowspec.errors import ConfigError, FlowSpecError, RequestCancelled
from flowspec.model import Drafter
from flowspec.model.precision import resolve_device
from flowspec.net import TlsConfig
from flowspec.node.backend import Backend
from flowspec.node.build import Deployment, build_head, deployment, device_for, precisions_for
from flowspec.node.head import GenerationResult, HeadNode
from flowspec.node.local import LocalCluster
from flowspec.sched import Budget, BudgetOverrides, Mode, SamplingParams, choose_budget
from flowspec.text import TextStream, chat_ids

__all__ = ["Cluster", "GenerationResult", "Request", "WaitingCallback", "default_draft"]

WaitingCallback = Callable[[int, str, float], None]  # (stage, address, seconds waited so far)

_DEFAULT_DRAFTS = {"qwen2.5-coder-1.5b": "qwen2.5-coder-0.5b", "smollm2-135m": "self:layers=20"}


def default_draft(model: str) -> str | None:
    return _DEFAULT_DRAFTS.get(model)


@dataclass(frozen=True)
class Request:
    """One generation request; `budget` sets tree budget fields (a BudgetOverrides, or a dict of Budget field
    -> value, checked here), the runtime chooses the rest (flowspec.sched.costs)."""

    mode: str = "flowspec"
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    budget: BudgetOverrides = BudgetOverrides()

    def __post_init__(self) -> None:
        if not isinstance(self.budget, BudgetOverrides):  # an app's dict: checked once, here
            object.__setattr__(self, "budget", BudgetOverrides.of(self.budget))


class Cluster:
    """A head (this process) connected to a pipeline of stages. Make one with `start_local` or `connect`."""

    def __init__(self, head: HeadNode, dep: Deployment, config: ClusterConfig, tokenizer: Any,
                 local: LocalCluster | None = None, device: torch.device | None = None) -> None:
        from flowspec.store import resolve

        self.head, self.dep, self.config, self.tokenizer, self.local = head, dep, config, tokenizer, local
        self.cache_dir = config.cache_dir
        self.device = device or torch.device("cpu")  # the head's: its lm_head and drafter
        drafter = head.drafter
        self.draft_spec = getattr(drafter, "name", None) if drafter is not None else config.draft
        self._drafter_loading = asyncio.Lock()  # concurrent first requests load the drafter once
        self.eos_ids = _eos_ids(resolve(dep.model, config.cache_dir), tokenizer, dep.config.eos_token_ids)

    # -- construction --------------------------------------------------------------------------------------
    @classmethod
    async def start_local(cls, model: str | None = None, stages: int = 4, *, config: ClusterConfig | None = None,
                          layers: list[int] | None = None, node_args: Sequence[str] = (),
                          **settings: Any) -> Cluster:
        """Start `stages` stage processes on loopback and connect to them.

        The cluster is `config` (a ClusterConfig) with `model` and `settings` (its fields: draft=, cache_dir=,
        device=, dtype=, quant=, group_size=, heartbeat_timeout=, step_timeout=, recovery_timeout=,
        max_requests=, timeouts=) applied; every stage and the head run on `device` in `dtype` with `quant`
        weights (see flowspec.model.precision). `node_args`: more flowspec-node options for every stage. The
        processes end with `aclose()`, and never outlive this process: an app that exits without it (or dies)
        ends them too (flowspec.node.local)."""
        config = ClusterConfig.build(config, **({"model": model} if model is not None else {}), **settings)
        # every part runs here: `auto` means this machine's GPU, if any
        config = replace(config, device=str(resolve_device(config.device)))
        local = LocalCluster(config.model, stages, layers, config.cache_dir,
                             extra_args=[*config.stage_args(), *node_args])
        precisions = precisions_for(local.peers, config.dtype, config.quant, config.group_size, config.device)
        try:
            # split once here, not in N racing processes
            dep = await asyncio.to_thread(deployment, config.model, stages, layers, config.cache_dir, precisions)
            await local.start()
            return await cls._connect(local.peers, dep, config, local=local)
        except BaseException:
            await shielded(asyncio.to_thread(local.stop))
            raise

    @classmethod
    async def connect(cls, peers: str | os.PathLike[str] | Peers, config: ClusterConfig | None = None, *,
                      secret: bytes | None = None, tls: TlsConfig | None = None, backend: Backend | None = None,
                      on_waiting: WaitingCallback | None = None, drafter: Drafter | None = None,
                      **settings: Any) -> Cluster:
        """Connect to running `flowspec-node` processes listed in a peers file (the head is line 1).

        The cluster is `config` with `settings` applied (`model=` is needed without a config; the fields are
        those of flowspec.config.ClusterConfig, checked as it is built: a nan, inf or negative duration is a
        ConfigError before anything starts). A stage that is not up yet (booting, restarting) is waited for,
        retrying with backoff, for up to `recovery_timeout` seconds; `on_waiting(stage, address,
        seconds_waited)` is told while it waits; a lost stage is waited for as long (restarted, or a standby=
        address), then its requests fail (0: fail at once). `device`, `dtype`, `quant`, `group_size`: the
        pipeline's number formats, as every stage was started with them (a peers-file line's
        device=/dtype=/quant= wins); a stage that disagrees is refused. `max_requests`: requests generated at
        once (up to a stage's limit, 8); more wait for a place, and each produces what it would alone.

        `secret` (else $FLOWSPEC_SECRET) and `tls` (flowspec.net.TlsConfig: this head's certificate and key, and
        the CA that signed every node's certificate) are how the links authenticate. `backend` is where the
        head's compute runs and how its links reach the wire (flowspec.node.Backend; the default is this
        machine). `drafter`: an already loaded Drafter, instead of loading `draft` at the first request.
        """
        if drafter is not None and "draft" in settings:
            raise ConfigError("give draft= (a spec to load) or drafter= (one loaded), not both")
        if "draft" in settings and isinstance(settings["draft"], Drafter):  # the keyword apps used before
            drafter = settings.pop("draft")
        config = ClusterConfig.build(config, **settings)
        parsed = peers if isinstance(peers, Peers) else read_peers(peers)
        precisions = precisions_for(parsed, config.dtype, config.quant, config.group_size, config.device)
        dep = await asyncio.to_thread(deployment, config.model, parsed.num_stages, parsed.layers, config.cache_dir,
                                      precisions, prepare=[0])
        return await cls._connect(parsed, dep, config, secret=secret or load_secret(), tls=tls,
                                  backend=backend, on_waiting=on_waiting, drafter=drafter)

    @classmethod
    async def _connect(cls, peers: Peers, dep: Deployment, config: ClusterConfig, *, secret: bytes | None = None,
                       tls: TlsConfig | None = None, backend: Backend | None = None,
                       on_waiting: WaitingCallback | None = None, local: LocalCluster | None = None,
                       drafter: Drafter | None = None) -> Cluster:
        from flowspec.store import load_tokenizer

        head_device = device_for(peers, 0, config.device)
        head = await asyncio.to_thread(
            build_head, dep, peers, secret, config.link_timeouts, step_timeout=config.step_timeout,
            recovery_timeout=config.recovery_timeout, backend=backend or Backend(), device=head_device, tls=tls,
            max_requests=config.max_requests, drafter=drafter, on_waiting=on_waiting)
        # the tokenizer before the links: loading it takes seconds on a busy CPU, and a stage whose link is up
        # while nothing answers its pings drops the head (on a worker thread, so the loop stays free anyway)
        tokenizer = await asyncio.to_thread(load_tokenizer, dep.model, config.cache_dir)
        cluster = cls(head, dep, config, tokenizer, local, head_device)
        try:
            with _flowspec_errors():  # what fails while connecting comes out as the FlowSpecError it is
                await head.connect()
        except BaseException:
            await head.aclose()
            raise
        return cluster

    async def aclose(self) -> None:
        try:
            await self.head.aclose()
        finally:
            if self.local is not None:  # waits up to seconds for each process: off the loop, to its end
                await shielded(asyncio.to_thread(self.local.stop))

    async def __aenter__(self) -> Cluster:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- generation ----------------------------------------------------------------------------------------
    def encode(self, prompt: str | Sequence[int], chat: bool = True) -> list[int]:
        """Token ids for a prompt: a user message wrapped in the chat template, raw text, or ids as given."""
        if not isinstance(prompt, str):
            return list(prompt)
        if chat:
            return self.encode_messages([{"role": "user", "content": prompt}])
        return list(self.tokenizer.encode(prompt))

    def encode_messages(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        """Token ids of a conversation (`role`/`content` dicts) in the model's chat template, ready for the
        assistant's answer; without a template, the contents one per line."""
        return chat_ids(self.tokenizer, messages)

    def budget(self, request: Request) -> Budget:
        """The request's tree budget: chosen from the pipeline's measured cost curves (flowspec.sched.costs),
        with the fields the request sets winning; without measurements, Budget's defaults."""
        mode = Mode.parse(request.mode)
        return choose_budget(mode, self.head.num_stages, self.head.cost_model(), request.budget)

    async def prepare(self, mode: str) -> None:
        """Load what `mode` needs (the drafter) now, rather than during its first request."""
        await self._ensure_drafter(Mode.parse(mode))

    async def _ensure_drafter(self, mode: Mode) -> None:
        if mode is Mode.AR or self.head.drafter is not None:
            return
        spec = self.draft_spec or default_draft(self.dep.model)
        if spec is None:
            raise ConfigError(f"mode {mode.value} needs a draft model: pass --draft (a model sharing the "
                              "target's tokenizer, self, self:layers=N or random)")
        from flowspec.store import make_drafter

        async with self._drafter_loading:
            if self.head.drafter is not None:
                return  # another request loaded it meanwhile
            # on a worker thread: loading takes seconds, and a blocked loop misses the links' heartbeats
            drafter = await asyncio.to_thread(make_drafter, spec, self.dep.model, self.cache_dir, 0, 1024,
                                              self.dep.precisions[0], self.device)
            self.head.drafter = drafter
            self.draft_spec = spec
            await self.head.probe()  # what a drafter level costs here: budgets depend on it

    async def stream_tokens(self, prompt: str | Sequence[int], request: Request = Request(),
                            result: GenerationResult | None = None,
                            chat: bool = True) -> AsyncGenerator[list[int], None]:
        """Yield token ids as they are committed; `stream` and `generate` are built on it. Whatever fails
        comes out as a FlowSpecError (see `_flowspec_errors`)."""
        await self._ensure_drafter(Mode.parse(request.mode))
        budget = self.budget(request)
        sampling = SamplingParams(request.temperature, request.top_p, request.seed)
        # aclosing: a consumer that stops early (break, aclose) ends the request now, not when the GC finds it
        with _flowspec_errors():
            async with aclosing(self.head.generate(self.encode(prompt, chat), budget, sampling,
                                                   request.max_new_tokens, self.eos_ids, result)) as tokens:
                async for new in tokens:
                    yield new

    async def stream(self, prompt: str | Sequence[int], request: Request | None = None,
                     result: GenerationResult | None = None, chat: bool = True, stop: Sequence[str] = (),
                     **kwargs: Any) -> AsyncGenerator[str, None]:
        """Yield text as it is generated (keyword arguments are fields of `Request`): whole characters only,
        and with `stop` strings the answer ends before the first one (which is not shown)."""
        request = replace(request or Request(), **kwargs)
        text = TextStream(self.decode, stop)
        async with aclosing(self.stream_tokens(prompt, request, result, chat)) as stream:
            async for new in stream:
                if delta := text.feed(new):
                    yield delta
                if text.stopped:
                    break  # closing the token stream ends the request on every stage
        if rest := text.finish():
            yield rest

    async def generate(self, prompt: str | Sequence[int], request: Request | None = None, chat: bool = True,
                       **kwargs: Any) -> GenerationResult:
        result = GenerationResult()
        async for _ in self.stream_tokens(prompt, replace(request or Request(), **kwargs), result, chat):
            pass
        return result

    def decode(self, tokens: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(tokens), skip_special_tokens=True))


@contextlib.contextmanager
def _flowspec_errors() -> Iterator[None]:
    """The library's one exception map: an error from inside a TaskGroup (the request driver's) comes out as
    the FlowSpecError it is, not as an ExceptionGroup around it (see `_unwrap`)."""
    try:
        yield
    except BaseExceptionGroup as group:
        error = _unwrap(group)
        if error is None:
            raise
        raise error from error.__cause__  # its own cause, not the group that carried it


def _unwrap(group: BaseExceptionGroup[BaseException]) -> FlowSpecError | None:
    """The error a group stands for when every leaf is a FlowSpecError: the first one that is not a mere
    cancellation (else the first), with the others as notes on it. None when any leaf is something else (a
    bug, a KeyboardInterrupt), which must propagate as it is."""
    leaves = list(_leaves(group))
    if not all(isinstance(leaf, FlowSpecError) for leaf in leaves):
        return None
    errors = [leaf for leaf in leaves if isinstance(leaf, FlowSpecError)]
    first = next((e for e in errors if not isinstance(e, RequestCancelled)), errors[0])
    for other in errors:
        if other is not first:
            add_note(first, f"also: {type(other).__name__}: {other}")
    return first


def _leaves(group: BaseExceptionGroup[BaseException]) -> Iterator[BaseException]:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc


def _eos_ids(folder: Path, tokenizer: Any, config_eos: Sequence[int]) -> tuple[int, ...]:
    """EOS ids as transformers' generate uses them: generation_config.json first, then the model config."""
    gen = folder / "generation_config.json"
    if gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        if eos is not None:
            return tuple(eos) if isinstance(eos, list) else (int(eos),)
    if config_eos:
        return tuple(config_eos)
    return (tokenizer.eos_token_id,) if tokenizer.eos_token_id is not None else ()
