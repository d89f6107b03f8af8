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
from flowspec.model.precision import Precision
from flowspec.model.quant import Int8Embedding, quantize_module, quantized_linear
from flowspec.model.stage import LMHead, StageModel
from flowspec.store.registry import resolve
from flowspec.store.shard import embedding_names, linear_names, manifest_precision, read_manifest, verify_weights
from flowspec.store.weights import head_tensors, open_hf_weights, read_hf_config, stage_tensors

PathLike = str | os.PathLike[str]


def _load_weights(shard_dir: PathLike, man: dict[str, Any]) -> dict[str, torch.Tensor]:
    path = Path(shard_dir) / man.get("weights", "weights.safetensors")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelError(f"cannot read {path} ({e}); the shard is corrupt: split the model again") from e


def _fill(module: torch.nn.Module, tensors: dict[str, torch.Tensor], where: PathLike,
          precision: Precision = Precision()) -> None:
    """Put stored tensors into a module built on the meta device: with quantization the linears and the
    embedding are rebuilt from their parts (convert_tensors' layout); everything else is assigned as it is."""
    quantized = precision.quant != "none"
    linears = sorted(linear_names(module)) if quantized else []
    tables = sorted(embedding_names(module)) if quantized else []
    try:
        for name in tables:
            weight, scales = tensors.pop(f"{name}.weight_int8"), tensors.pop(f"{name}.scales")
            module.set_submodule(name, Int8Embedding(weight, scales, precision.torch_dtype))
        for name in linears:
            parts = {k[len(name) + 1:]: tensors.pop(k) for k in [k for k in tensors if k.startswith(name + ".")]}
            bias = parts.pop("bias", None)
            module.set_submodule(name, quantized_linear(parts, precision.quant, precision.group_size, bias))
    except KeyError as e:
        raise ModelError(f"{where}: a layer is not stored as {precision.tag} (missing {e}); split again") from e
    try:
        result = module.load_state_dict(tensors, strict=not quantized, assign=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise ModelError(f"{where}: weights do not fit the manifest's model ({first}); split the model again") from e
    rebuilt = [*linears, *tables]
    missing = [k for k in result.missing_keys if not any(k.startswith(name + ".") for name in rebuilt)]
    if missing or result.unexpected_keys:
        raise ModelError(f"{where}: weights do not fit the manifest's model (missing {missing[:3]}, unexpected "
                         f"{result.unexpected_keys[:3]}); split the model again")
    module.eval().requires_grad_(False)


def load_stage(
    shard_dir: PathLike, expect_fingerprint: str | None = None, expect_stage: int | None = None,
    verify: bool | None = None, device: torch.device | str = "cpu",
) -> StageModel:
    """A stage (k >= 1) from its shard folder, in the format it was split in, on `device`; checks manifest,
    size and (by default if small) sha256."""
    man = read_manifest(shard_dir, expect_fingerprint, expect_stage)
    if man["stage"] == 0:
        raise ModelError(f"{shard_dir} is the head (stage 0); use load_head")
    verify_weights(shard_dir, man, verify)
    cfg = ModelConfig.from_dict(man["config"])
    a, b = man["layer_range"]
    with torch.device("meta"):  # no throwaway random init: assign=True puts the real tensors in
        model = StageModel(cfg, a, b, man["has_embedding"], man["has_final_norm"])
    _fill(model, _load_weights(shard_dir, man), shard_dir, manifest_precision(man))
    model.rope.inv_freq = _inv_freq(cfg)
    model.fingerprint = man["fingerprint"]
    return model.to(device)


def load_head(
    shard_dir: PathLike, expect_fingerprint: str | None = None, verify: bool | None = None,
    device: torch.device | str = "cpu",
) -> LMHead:
    man = read_manifest(shard_dir, expect_fingerprint, expect_stage=0)
    verify_weights(shard_dir, man, verify)
    cfg = ModelConfig.from_dict(man["config"])
    with torch.device("meta"):
        head = LMHead(cfg)
    _fill(head, _load_weights(shard_dir, man), shard_dir, manifest_precision(man))
    head.fingerprint = man["fingerprint"]
    return head.to(device)


def _inv_freq(cfg: ModelConfig) -> torch.Tensor:
    # buffers built on the meta device are empty; recompute exactly as RoPE.__init__ does
    return 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float) / cfg.head_dim))


def load_full(
    ref: PathLike, cache_dir: PathLike | None = None, num_layers: int | None = None,
    precision: Precision = Precision(), device: torch.device | str = "cpu",
) -> tuple[StageModel, LMHead]:
    """The whole model (or its first `num_layers` layers) as one StageModel with embedding + final norm, converted
    to `precision` in memory (drafters: D0 holds the draft model whole) and put on `device`."""
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
    if not precision.exact:
        if cfg.tie_word_embeddings:  # the head gets its own (quantized) copy; the embedding stays a table
            head.lm_head.weight = torch.nn.Parameter(head.lm_head.weight.detach().clone(), requires_grad=False)
        for part in (model, head):
            if precision.quant != "none":  # from the fp32 weights, before the rest is cast
                quantize_module(part, precision.quant, precision.group_size, precision.torch_dtype)
            part.to(precision.torch_dtype)
    return model.to(device), head.to(device)


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
