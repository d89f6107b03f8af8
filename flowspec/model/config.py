"""ModelConfig: the few numbers our model code needs, derived once from a transformers config dict."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from flowspec.errors import ModelError

SUPPORTED_ARCHS = ("llama", "qwen2", "mistral")  # one block: RMSNorm, RoPE, GQA attention, SwiGLU


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    arch: str  # "llama" or "qwen2"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int = 0  # 0: derived as hidden_size // num_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # qwen2 has biases on q, k and v
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.arch not in SUPPORTED_ARCHS:
            raise ModelError(f"unsupported architecture {self.arch!r}; flowspec runs {', '.join(SUPPORTED_ARCHS)}")
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.num_heads % self.num_kv_heads:
            raise ModelError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        object.__setattr__(self, "eos_token_ids", tuple(int(t) for t in self.eos_token_ids))

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> ModelConfig:
        """Map a transformers config.json dict (llama or qwen2) to ours; refuse what we cannot run exactly."""
        arch = cfg.get("model_type", "")
        if arch not in SUPPORTED_ARCHS:
            raise ModelError(f"model_type {arch!r} is not supported; flowspec runs {', '.join(SUPPORTED_ARCHS)}")
        if cfg.get("hidden_act", "silu") != "silu" or cfg.get("mlp_bias", False):
            raise ModelError("only SwiGLU (silu, no MLP bias) models are supported")
        rope = cfg.get("rope_parameters") or {}
        rope_type = rope.get("rope_type") or (cfg.get("rope_scaling") or {}).get("rope_type", "default")
        if rope_type != "default":
            raise ModelError(f"rope type {rope_type!r} is not supported (only plain RoPE)")
        eos = cfg.get("eos_token_id")
        eos_ids = () if eos is None else (tuple(eos) if isinstance(eos, list) else (eos,))
        return cls(
            arch=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=cfg["num_attention_heads"],
            num_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
            head_dim=cfg.get("head_dim") or 0,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
            # Mistral's sliding window: exact only within it, so the context stops there
            max_position_embeddings=min(cfg.get("max_position_embeddings", 2048),
                                        cfg.get("sliding_window") or 1 << 30),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            # qwen2 always has q/k/v biases; llama only when attention_bias says so
            attention_bias=arch == "qwen2" or bool(cfg.get("attention_bias", False)),
            eos_token_ids=eos_ids,
            bos_token_id=cfg.get("bos_token_id"),
        )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {k: (tuple(v) if k == "eos_token_ids" else v) for k, v in d.items() if k in known}
        return cls(**kwargs)

    def canonical_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @property
    def fingerprint(self) -> str:
        """sha256 of the canonical config json: equal configs give equal fingerprints, whatever the source."""
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim
