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
import json
import os
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from flowspec.config import Peers, load_secret, read_peers
from flowspec.errors import ConfigError
from flowspec.net import LinkShape, Timeouts
from flowspec.node.build import Deployment, build_head, deployment
from flowspec.node.head import GenerationResult, HeadNode
from flowspec.node.local import LocalCluster
from flowspec.sched import Budget, Mode, SamplingParams

__all__ = ["Cluster", "GenerationResult", "Request", "default_draft"]

_DEFAULT_DRAFTS = {"qwen2.5-coder-1.5b": "qwen2.5-coder-0.5b", "smollm2-135m": "self:layers=20"}


def default_draft(model: str) -> str | None:
    return _DEFAULT_DRAFTS.get(model)


@dataclass(frozen=True)
class Request:
    """One generation request; `budget` overrides tree budgets (see flowspec.sched.Budget)."""

    mode: str = "flowspec"
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    budget: dict[str, int] = field(default_factory=dict)


class Cluster:
    """A head (this process) connected to a pipeline of stages."""

    def __init__(self, head: HeadNode, dep: Deployment, draft: str | None, cache_dir: str | None,
                 local: LocalCluster | None = None) -> None:
        from flowspec.model import load_tokenizer, resolve

        self.head, self.dep, self.draft_spec, self.cache_dir, self.local = head, dep, draft, cache_dir, local
        self.head_device: Any = None  # flowspec.node.pacer.HeadDevice when emulating a device profile
        self.tokenizer = load_tokenizer(dep.model, cache_dir)
        self.eos_ids = _eos_ids(resolve(dep.model, cache_dir), self.tokenizer, dep.config.eos_token_ids)

    # -- construction --------------------------------------------------------------------------------------
    @classmethod
    async def start_local(cls, model: str, stages: int, *, draft: str | None = None,
                          layers: list[int] | None = None, cache_dir: str | None = None,
                          link: str | None = None, timeouts: Timeouts | None = None,
                          recovery_timeout: float = 30.0,
                          node_args: Sequence[str] = (), step_timeout: float = 60.0,
                          profile: str | None = None, dilation: float = 1.0) -> Cluster:
        """Start `stages` stage processes on loopback and connect to them.

        `link` shapes every hop of the ring (each on its sending side); `profile` (a device cost profile name or
        TOML file, see flowspec.model.profiles) paces every stage and the head's lm_head and drafter, with all
        device times and link latencies × `dilation` and bandwidths / `dilation`.
        """
        dep = deployment(model, stages, layers, cache_dir)  # split once here, not in N racing processes
        extra = list(node_args)
        if link:
            extra += ["--link", link]
        if profile:
            extra += ["--profile", profile]
        if link or profile:
            extra += ["--dilation", repr(float(dilation))]
        local = LocalCluster(model, stages, layers, cache_dir, extra_args=extra)
        await local.start()
        try:
            return await cls._connect(local.peers, dep, draft, cache_dir, None, link, timeouts, local,
                                      step_timeout, profile, dilation, recovery_timeout=recovery_timeout)
        except BaseException:
            local.stop()
            raise

    @classmethod
    async def connect(cls, peers: str | os.PathLike[str] | Peers, *, model: str, draft: str | None = None,
                      cache_dir: str | None = None, secret: bytes | None = None, link: str | None = None,
                      timeouts: Timeouts | None = None, step_timeout: float = 60.0,
                      recovery_timeout: float = 30.0) -> Cluster:
        """Connect to running `flowspec-node` processes listed in a peers file (the head is line 1).

        `timeouts` are the head's link deadlines (heartbeats); a lost stage is waited for (restarted, or a
        standby= address) up to `recovery_timeout` seconds, then the request fails (0: fail at once).
        """
        parsed = peers if isinstance(peers, Peers) else read_peers(peers)
        dep = deployment(model, parsed.num_stages, parsed.layers, cache_dir)
        return await cls._connect(parsed, dep, draft, cache_dir, secret or load_secret(), link, timeouts, None,
                                  step_timeout, recovery_timeout=recovery_timeout)

    @classmethod
    async def _connect(cls, peers: Peers, dep: Deployment, draft: str | None, cache_dir: str | None,
                       secret: bytes | None, link: str | None, timeouts: Timeouts | None,
                       local: LocalCluster | None, step_timeout: float, profile: str | None = None,
                       dilation: float = 1.0, recovery_timeout: float = 30.0) -> Cluster:
        shape = LinkShape.parse(link).scaled(dilation) if link else None
        device, charge = None, None
        if profile:
            from flowspec.model.profiles import load_profile, make_charge_bytes
            from flowspec.node.pacer import HeadDevice

            prof = load_profile(profile)
            device, charge = HeadDevice(prof, dilation), make_charge_bytes(prof)
        head = build_head(dep, peers, secret, timeouts or Timeouts(), shape=shape, step_timeout=step_timeout,
                          charge_bytes=charge, recovery_timeout=recovery_timeout)
        if device is not None:
            head.lm_head = device.lm_head(head.lm_head)  # type: ignore[assignment]
        # the tokenizer first: loading it blocks the loop for seconds on a busy CPU, and with the links already
        # up that missed their heartbeats (every stage dropped the head; the first request needed a recovery)
        cluster = cls(head, dep, draft, cache_dir, local)
        cluster.head_device = device
        await head.connect()
        return cluster

    async def aclose(self) -> None:
        await self.head.aclose()
        if self.local is not None:
            self.local.stop()

    async def __aenter__(self) -> Cluster:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- generation ----------------------------------------------------------------------------------------
    def encode(self, prompt: str | Sequence[int], chat: bool = True) -> list[int]:
        """Token ids for a prompt: a user message wrapped in the chat template, raw text, or ids as given."""
        if not isinstance(prompt, str):
            return list(prompt)
        if chat and getattr(self.tokenizer, "chat_template", None):
            ids = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                     add_generation_prompt=True, tokenize=True)
            return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        return list(self.tokenizer.encode(prompt))

    def budget(self, request: Request) -> Budget:
        mode = Mode.parse(request.mode)
        return Budget(mode=mode, num_stages=self.head.num_stages, **request.budget)

    async def _ensure_drafter(self, mode: Mode) -> None:
        if mode is Mode.AR or self.head.drafter is not None:
            return
        spec = self.draft_spec or default_draft(self.dep.model)
        if spec is None:
            raise ConfigError(f"mode {mode.value} needs a draft model: pass --draft (a model sharing the "
                              "target's tokenizer, self, self:layers=N or random)")
        from flowspec.model import make_drafter

        # on a worker thread: loading takes seconds, and a blocked loop misses the links' heartbeats
        drafter = await asyncio.to_thread(make_drafter, spec, self.dep.model, self.cache_dir)
        if self.head.drafter is not None:
            return  # another request loaded it meanwhile
        self.head.drafter = self.head_device.drafter(drafter) if self.head_device is not None else drafter
        self.draft_spec = spec

    async def stream_tokens(self, prompt: str | Sequence[int], request: Request = Request(),
                            result: GenerationResult | None = None, chat: bool = True) -> AsyncIterator[list[int]]:
        budget = self.budget(request)
        await self._ensure_drafter(budget.mode)
        sampling = SamplingParams(request.temperature, request.top_p, request.seed)
        async for tokens in self.head.generate(self.encode(prompt, chat), budget, sampling,
                                               request.max_new_tokens, self.eos_ids, result):
            yield tokens

    async def stream(self, prompt: str | Sequence[int], request: Request | None = None,
                     result: GenerationResult | None = None, chat: bool = True, **kwargs: Any) -> AsyncIterator[str]:
        """Yield text as it is generated (keyword arguments are fields of `Request`)."""
        request = replace(request or Request(), **kwargs)
        tokens: list[int] = []
        shown = ""
        async for new in self.stream_tokens(prompt, request, result, chat):
            tokens.extend(new)
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            if text.endswith("\ufffd"):
                continue  # half a UTF-8 character: wait for the rest
            if text.startswith(shown):
                delta, shown = text[len(shown):], text
                if delta:
                    yield delta

    async def generate(self, prompt: str | Sequence[int], request: Request | None = None, chat: bool = True,
                       **kwargs: Any) -> GenerationResult:
        result = GenerationResult()
        async for _ in self.stream_tokens(prompt, replace(request or Request(), **kwargs), result, chat):
            pass
        return result

    def decode(self, tokens: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(tokens), skip_special_tokens=True))


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
