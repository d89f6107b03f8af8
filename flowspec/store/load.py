"""Loading: stage shards, the head, whole models (for drafters and tests), tokenizers, the HF reference."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from flowspec.errors import ModelError
from flowspec.model.config import ModelConfig
from flowspec.model.stage import LMHead, StageModel
from flowspec.store.registry import resolve
from flowspec.store.shard import read_manifest, verify_weights
from flowspec.store.weights import head_tensors, open_hf_weights, read_hf_config, stage_tensors

PathLike = str | os.PathLike[str]


def _load_weights(shard_dir: PathLike, man: dict[str, Any]) -> dict[str, torch.Tensor]:
    path = Path(shard_dir) / man.get("weights", "weights.safetensors")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelError(f"cannot read {path} ({e}); the shard is corrupt: split the model again") from e


def _fill(module: torch.nn.Module, tensors: dict[str, torch.Tensor], where: PathLike) -> None:
    try:
        module.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise ModelError(f"{where}: weights do not fit the manifest's model ({first}); split the model again") from e
    module.eval().requires_grad_(False)


def load_stage(
    shard_dir: PathLike, expect_fingerprint: str | None = None, expect_stage: int | None = None,
    verify: bool | None = None,
) -> StageModel:
    """A stage (k >= 1) from its shard folder; checks manifest, size and (by default if small) sha256."""
    man = read_manifest(shard_dir, expect_fingerprint, expect_stage)
    if man["stage"] == 0:
        raise ModelError(f"{shard_dir} is the head (stage 0); use load_head")
    verify_weights(shard_dir, man, verify)
    cfg = ModelConfig.from_dict(man["config"])
    a, b = man["layer_range"]
    with torch.device("meta"):  # no throwaway random init: assign=True puts the real tensors in
        model = StageModel(cfg, a, b, man["has_embedding"], man["has_final_norm"])
    _fill(model, _load_weights(shard_dir, man), shard_dir)
    model.rope.inv_freq = _inv_freq(cfg)
    model.fingerprint = man["fingerprint"]
    return model


def load_head(
    shard_dir: PathLike, expect_fingerprint: str | None = None, verify: bool | None = None
) -> LMHead:
    man = read_manifest(shard_dir, expect_fingerprint, expect_stage=0)
    verify_weights(shard_dir, man, verify)
    cfg = ModelConfig.from_dict(man["config"])
    with torch.device("meta"):
        head = LMHead(cfg)
    _fill(head, _load_weights(shard_dir, man), shard_dir)
    head.fingerprint = man["fingerprint"]
    return head


def _inv_freq(cfg: ModelConfig) -> torch.Tensor:
    # buffers built on the meta device are empty; recompute exactly as RoPE.__init__ does
    return 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float) / cfg.head_dim))


def load_full(
    ref: PathLike, cache_dir: PathLike | None = None, num_layers: int | None = None
) -> tuple[StageModel, LMHead]:
    """The whole model (or its first `num_layers` layers) as one StageModel with embedding + final norm."""
    folder = resolve(ref, cache_dir)
    cfg = read_hf_config(folder)
    n = cfg.num_layers if num_layers is None else num_layers
    if not 1 <= n <= cfg.num_layers:
        raise ModelError(f"layers={n}: {folder.name} has {cfg.num_layers} layers; pick 1..{cfg.num_layers}")
    with torch.device("meta"):
        model, head = StageModel(cfg, 0, n, True, True), LMHead(cfg)
    with open_hf_weights(folder) as get:
        _fill(model, stage_tensors(get, cfg, 0, n, True, True), folder)
        if cfg.tie_word_embeddings:
            assert model.embed is not None  # a whole model has its embedding
            head.lm_head.weight = model.embed.weight  # tied: share, do not hold the table twice
        else:
            _fill(head, head_tensors(get, cfg), folder)
    model.rope.inv_freq = _inv_freq(cfg)
    return model, head


def load_tokenizer(ref: PathLike, cache_dir: PathLike | None = None) -> Any:
    from transformers import AutoTokenizer

    folder = resolve(ref, cache_dir)
    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        raise ModelError(f"{folder} has no tokenizer files (tokenizer.json)")
    return AutoTokenizer.from_pretrained(str(folder))


def load_hf_reference(ref: PathLike, cache_dir: PathLike | None = None) -> Any:
    """transformers' own model from the same folder, fp32, eval: the numerics our code must reproduce."""
    from transformers import AutoModelForCausalLM

    folder = resolve(ref, cache_dir)
    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
