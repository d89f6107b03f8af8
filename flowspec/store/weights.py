"""The one place that maps transformers weight names to ours (fusing q|k|v and gate|up), done once at split."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open

from flowspec.errors import ModelError
from flowspec.model.config import ModelConfig

Getter = Callable[[str], torch.Tensor]


def read_hf_config(folder: Path) -> ModelConfig:
    path = folder / "config.json"
    if not path.is_file():
        raise ModelError(f"{folder} is not a model folder: config.json is missing")
    return ModelConfig.from_hf(json.loads(path.read_text()))


def weight_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelError(f"{folder} has no *.safetensors weights")
    return files


@contextmanager
def open_hf_weights(folder: Path) -> Iterator[Getter]:
    """Yield get(name) -> fp32 tensor over every *.safetensors file of an HF folder (lazy, mmap)."""
    handles = [safe_open(str(f), framework="pt") for f in weight_files(folder)]
    where = {key: h for h in handles for key in h.keys()}

    def get(name: str) -> torch.Tensor:
        if name not in where:
            raise ModelError(f"weight {name!r} is missing from {folder}")
        return where[name].get_tensor(name).to(torch.float32)

    try:
        yield get
    finally:
        handles.clear()


def stage_tensors(
    get: Getter, cfg: ModelConfig, start: int, end: int, embedding: bool, final_norm: bool
) -> dict[str, torch.Tensor]:
    """Our state dict for StageModel(cfg, start, end, embedding, final_norm), from HF names."""
    out: dict[str, torch.Tensor] = {}
    if embedding:
        out["embed.weight"] = get("model.embed_tokens.weight")
    for local, i in enumerate(range(start, end)):
        hf, ours = f"model.layers.{i}.", f"layers.{local}."
        out[ours + "attn_norm.weight"] = get(hf + "input_layernorm.weight")
        out[ours + "mlp_norm.weight"] = get(hf + "post_attention_layernorm.weight")
        qkv = [get(f"{hf}self_attn.{p}_proj.weight") for p in "qkv"]
        out[ours + "attn.wqkv.weight"] = torch.cat(qkv, dim=0)
        if cfg.attention_bias:
            out[ours + "attn.wqkv.bias"] = torch.cat([get(f"{hf}self_attn.{p}_proj.bias") for p in "qkv"])
        out[ours + "attn.wo.weight"] = get(hf + "self_attn.o_proj.weight")
        gate_up = [get(hf + "mlp.gate_proj.weight"), get(hf + "mlp.up_proj.weight")]
        out[ours + "mlp.w_gate_up.weight"] = torch.cat(gate_up, dim=0)
        out[ours + "mlp.w_down.weight"] = get(hf + "mlp.down_proj.weight")
    if final_norm:
        out["norm.weight"] = get("model.norm.weight")
    return out


def head_tensors(get: Getter, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """LMHead state dict; a tied model's head is a copy of the embedding (D0 holds no embedding)."""
    name = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
    try:
        return {"lm_head.weight": get(name)}
    except ModelError:
        # some exports tie without saying so: fall back to the embedding
        return {"lm_head.weight": get("model.embed_tokens.weight")}
