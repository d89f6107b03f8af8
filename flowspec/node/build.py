"""Assembling nodes from a peers file and a model: shared by `flowspec-node`, `flowspec run` and the API."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from flowspec.config import RECOVERY_TIMEOUT_S, STEP_TIMEOUT_S, Peers
from flowspec.errors import ConfigError
from flowspec.model import ModelConfig
from flowspec.model.precision import DEFAULT_GROUP_SIZE, Precision, resolve_device
from flowspec.net import MAX_REQUESTS, PROTOCOL_VERSION, Hello, Limits, Timeouts, TlsConfig
from flowspec.node.backend import Backend
from flowspec.node.head import HeadNode
from flowspec.node.links import StageLinks
from flowspec.node.stage import StageNode
from flowspec.store import ensure_shards, load_head, load_stage, model_fingerprint, read_manifest, resolve
from flowspec.store.shard import plan_layers
from flowspec.store.weights import read_hf_config

__all__ = ["Deployment", "build_head", "build_stage", "deployment", "device_for", "precisions_for"]

MAX_ROWS = 256  # tokens per segment / prefill chunk on the wire; trees and chunks stay far below


@dataclass(frozen=True)
class Deployment:
    """What every node of one pipeline must agree on: the model, its split, each part's number format."""

    model: str
    counts: tuple[int, ...]
    fingerprint: str  # model + split + formats: nodes that disagree on any of them are refused
    config: ModelConfig
    precisions: tuple[Precision, ...]  # [0] the head (lm_head, drafter), [k] stage k
    cache_dir: str | os.PathLike[str] | None = None

    def limits(self) -> Limits:
        cfg = self.config
        return Limits.for_model(cfg.hidden_size, cfg.vocab_size, cfg.max_position_embeddings, max_rows=MAX_ROWS)

    def hello(self, role: str, index: int) -> Hello:
        return Hello(PROTOCOL_VERSION, role, index, self.fingerprint, bytes(16))

    def shard(self, index: int) -> Path:
        """Stage `index`'s shard folder in its format (split once, when missing)."""
        return ensure_shards(self.model, list(self.counts), self.cache_dir,
                             precision=self.precisions[index]) / f"stage-{index}"


def deployment(model: str, num_stages: int, layers: list[int] | None = None,
               cache_dir: str | os.PathLike[str] | None = None,
               precisions: Precision | Sequence[Precision] = Precision(),
               prepare: Sequence[int] | None = None) -> Deployment:
    """What identifies this pipeline; splits the shards of the parts in `prepare` (default: all) once, so that
    N stage processes do not race to write them."""
    if layers is not None and len(layers) != num_stages:
        raise ConfigError(f"{len(layers)} layer counts for {num_stages} stages")
    folder = resolve(model, cache_dir)
    cfg = read_hf_config(folder)
    counts = tuple(plan_layers(cfg.num_layers, layers, num_stages, model))
    per_part = tuple(precisions) if not isinstance(precisions, Precision) else (precisions,) * (num_stages + 1)
    if len(per_part) != num_stages + 1:
        raise ConfigError(f"{len(per_part)} number formats for a head and {num_stages} stages")
    fingerprint = f"{model_fingerprint(folder)[:16]}/{'-'.join(map(str, counts))}"
    if not all(p.exact for p in per_part):  # fp32 pipelines keep the fingerprint they always had
        fingerprint += "/" + ",".join(p.tag for p in per_part)
    dep = Deployment(model, counts, fingerprint, cfg, per_part, cache_dir)
    for precision in {per_part[k] for k in (prepare if prepare is not None else range(num_stages + 1))}:
        ensure_shards(model, list(counts), cache_dir, precision=precision)  # one split per format
    return dep


def build_stage(dep: Deployment, peers: Peers, index: int, secret: bytes | None, timeouts: Timeouts,
                backend: Backend | None = None, device: torch.device | str = "cpu",
                tls: TlsConfig | None = None) -> StageNode:
    shard = dep.shard(index)
    model = load_stage(shard, expect_fingerprint=read_manifest(shard)["fingerprint"], expect_stage=index,
                       device=device)
    nxt = peers.stage(index + 1) if index < peers.num_stages else None
    next_addresses = [(nxt.host, nxt.port), *nxt.standbys] if nxt else []
    return StageNode(index, peers.num_stages, model, dep.hello("stage", index), dep.limits(), timeouts, secret,
                     next_addresses, backend=backend, tls=tls)


def build_head(dep: Deployment, peers: Peers, secret: bytes | None, timeouts: Timeouts, *, drafter: Any = None,
               step_timeout: float = STEP_TIMEOUT_S, recovery_timeout: float = RECOVERY_TIMEOUT_S,
               backend: Backend | None = None, device: torch.device | str = "cpu",
               tls: TlsConfig | None = None, max_requests: int = MAX_REQUESTS,
               on_waiting: Callable[[int, str, float], None] | None = None) -> HeadNode:
    """The head of the pipeline `peers` describes; `on_waiting(stage, address, seconds)` is told while a stage
    is not up yet."""
    backend = backend or Backend()
    standbys = {k: p.standbys for k, p in enumerate(peers.stages, start=1) if p.standbys}
    links = StageLinks([(p.host, p.port) for p in peers.stages], dep.hello("head", 0), dep.limits(), timeouts,
                       secret, standbys=standbys, recovery_timeout=recovery_timeout, network=backend.network,
                       tls=tls, on_waiting=on_waiting)
    return HeadNode(load_head(dep.shard(0), device=device), links, drafter=drafter, step_timeout=step_timeout,
                    backend=backend, max_requests=max_requests)


def precisions_for(peers: Peers, dtype: str = "auto", quant: str = "none",
                   group_size: int = DEFAULT_GROUP_SIZE, device: str = "auto") -> tuple[Precision, ...]:
    """Each part's number format (head first), from its peers line (`dtype=`, `quant=`, `device=`) or the flags.

    Every node must come to the same answer, so `auto` resolves from what the line declares, not from what a
    machine happens to have: float16 where the line says `device=cuda...`, else float32 (bfloat16 with
    quantized weights)."""
    out = []
    for peer in (peers.head, *peers.stages):
        declared = peer.options.get("device", device)
        out.append(Precision.parse(peer.options.get("dtype", dtype), peer.options.get("quant", quant), group_size,
                                   torch.device("cuda") if declared.startswith("cuda") else None))
    return tuple(out)


def device_for(peers: Peers, index: int, default: str = "auto") -> torch.device:
    """Where part `index` (0 = the head) computes: its line's `device=`, else the flag."""
    peer = peers.head if index == 0 else peers.stage(index)
    return resolve_device(peer.options.get("device", default))
