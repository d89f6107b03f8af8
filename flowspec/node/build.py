"""Assembling nodes from a peers file and a model: shared by `flowspec-node`, `flowspec run` and the API."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flowspec.config import Peers
from flowspec.errors import ConfigError
from flowspec.model import ModelConfig
from flowspec.net import PROTOCOL_VERSION, Hello, Limits, Timeouts
from flowspec.node.backend import Backend
from flowspec.node.head import HeadNode
from flowspec.node.links import StageLinks
from flowspec.node.stage import StageNode
from flowspec.store import ensure_shards, load_head, load_stage, read_manifest

__all__ = ["Deployment", "build_head", "build_stage", "deployment"]

MAX_ROWS = 256  # tokens per segment / prefill chunk on the wire; trees and chunks stay far below


@dataclass(frozen=True)
class Deployment:
    """What every node of one pipeline must agree on: the model, its split, and the shard folder."""

    model: str
    shards: Path
    counts: tuple[int, ...]
    fingerprint: str  # model fingerprint + split: nodes with another model or split are refused
    config: ModelConfig

    def limits(self) -> Limits:
        cfg = self.config
        return Limits.for_model(cfg.hidden_size, cfg.vocab_size, cfg.max_position_embeddings, max_rows=MAX_ROWS)

    def hello(self, role: str, index: int) -> Hello:
        return Hello(PROTOCOL_VERSION, role, index, self.fingerprint, bytes(16))


def deployment(model: str, num_stages: int, layers: list[int] | None = None,
               cache_dir: str | os.PathLike[str] | None = None) -> Deployment:
    """Find (or make, once) the shards for this split and read what identifies it."""
    if layers is not None and len(layers) != num_stages:
        raise ConfigError(f"{len(layers)} layer counts for {num_stages} stages")
    shards = ensure_shards(model, layers, cache_dir, num_stages=num_stages)
    manifests: list[dict[str, Any]] = [read_manifest(shards / f"stage-{k}") for k in range(num_stages + 1)]
    counts = tuple(m["layer_range"][1] - m["layer_range"][0] for m in manifests[1:])
    fingerprint = f"{manifests[0]['fingerprint'][:16]}/{'-'.join(map(str, counts))}"
    return Deployment(model, shards, counts, fingerprint, ModelConfig.from_dict(manifests[0]["config"]))


def build_stage(dep: Deployment, peers: Peers, index: int, secret: bytes | None, timeouts: Timeouts,
                backend: Backend | None = None) -> StageNode:
    shard = dep.shards / f"stage-{index}"
    model = load_stage(shard, expect_fingerprint=read_manifest(shard)["fingerprint"], expect_stage=index)
    nxt = peers.stage(index + 1) if index < peers.num_stages else None
    next_addresses = [(nxt.host, nxt.port), *nxt.standbys] if nxt else []
    return StageNode(index, peers.num_stages, model, dep.hello("stage", index), dep.limits(), timeouts, secret,
                     next_addresses, backend=backend)


def build_head(dep: Deployment, peers: Peers, secret: bytes | None, timeouts: Timeouts, *, drafter: Any = None,
               step_timeout: float = 30.0, recovery_timeout: float = 30.0,
               backend: Backend | None = None) -> HeadNode:
    backend = backend or Backend()
    standbys = {k: p.standbys for k, p in enumerate(peers.stages, start=1) if p.standbys}
    links = StageLinks([(p.host, p.port) for p in peers.stages], dep.hello("head", 0), dep.limits(), timeouts,
                       secret, standbys=standbys, recovery_timeout=recovery_timeout, network=backend.network)
    return HeadNode(load_head(dep.shards / "stage-0"), links, drafter=drafter, step_timeout=step_timeout,
                    backend=backend)
