"""StageModel (a contiguous block of layers with its KV cache) and LMHead (the head D0 runs)."""

from __future__ import annotations

import torch
from torch import nn

from flowspec.errors import ModelError
from flowspec.model.config import ModelConfig
from flowspec.model.kv_cache import KVCache
from flowspec.model.layers import DecoderLayer, RMSNorm, RoPE
from flowspec.treemask import causal_visible


class StageModel(nn.Module):
    """Layers [start, end) of a model; embedding on the first stage, final norm on the last.

    Weight names (our one layout, see weights.py): embed.weight, layers.{i}.* (i local to the stage), norm.weight.
    """

    def __init__(
        self, cfg: ModelConfig, start: int, end: int, has_embedding: bool, has_final_norm: bool
    ) -> None:
        super().__init__()
        if not 0 <= start < end <= cfg.num_layers:
            raise ModelError(f"bad layer range [{start}, {end}) for a {cfg.num_layers}-layer model")
        self.cfg, self.start, self.end = cfg, start, end
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size) if has_embedding else None
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(start, end))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps) if has_final_norm else None
        self.rope = RoPE(cfg.head_dim, cfg.rope_theta)

    @property
    def num_layers(self) -> int:
        return self.end - self.start

    def new_cache(self, capacity: int, dtype: torch.dtype | None = None) -> KVCache:
        """A KV cache in the compute dtype, on this stage's device."""
        return KVCache(self.num_layers, self.cfg.num_kv_heads, self.cfg.head_dim, capacity,
                       dtype or self.embed_dtype, device=self.device)

    @torch.inference_mode()
    def forward(
        self,
        x: torch.Tensor,  # [n] int64 tokens (with embedding) or [n, H] hidden
        positions: torch.Tensor,  # [n] int64 absolute positions
        cache: KVCache,
        visible: torch.Tensor | None = None,  # bool [n, cache.length + n]; None = plain causal
    ) -> torch.Tensor:  # [n, H], post-norm on the last stage
        n = x.shape[0]
        self._check_inputs(x, positions, cache, visible)
        cache.check_room(n)
        start = cache.length
        device = self.device  # inputs come off the wire on the CPU
        h = self.embed(x.to(device)) if self.embed is not None else x.to(device, self.embed_dtype)
        mask = visible
        if mask is None and n > 1:
            mask = causal_visible(start, n)  # new rows are causal among themselves and see the whole cache
        mask = mask.to(device) if mask is not None else None
        rope = self.rope(positions.to(device), h.dtype)
        for i, layer in enumerate(self.layers):
            h = layer(h, rope, cache.k[i], cache.v[i], start, mask)
        cache.length = start + n  # only after every layer wrote its slots
        return self.norm(h) if self.norm is not None else h

    @property
    def weight_bytes(self) -> int:
        """Bytes of every parameter and buffer: what this stage holds in its device's memory besides KV."""
        return sum(t.nbytes for t in (*self.parameters(), *self.buffers()))

    @property
    def device(self) -> torch.device:
        layer = self.layers[0]
        assert isinstance(layer, DecoderLayer)
        return layer.attn_norm.weight.device

    @property
    def embed_dtype(self) -> torch.dtype:
        layer = self.layers[0]
        assert isinstance(layer, DecoderLayer)
        return layer.attn_norm.weight.dtype

    def _check_inputs(
        self, x: torch.Tensor, positions: torch.Tensor, cache: KVCache, visible: torch.Tensor | None
    ) -> None:
        n = x.shape[0]
        want = 1 if self.embed is not None else 2
        if x.dim() != want or (want == 2 and x.shape[1] != self.cfg.hidden_size):
            kind = "[n] token ids" if want == 1 else f"[n, {self.cfg.hidden_size}] hidden states"
            raise ModelError(f"stage [{self.start}, {self.end}) expects {kind}, got shape {tuple(x.shape)}")
        if positions.shape != (n,):
            raise ModelError(f"positions must be [{n}], got {tuple(positions.shape)}")
        if cache.k.shape[0] != self.num_layers:
            raise ModelError(f"KV cache has {cache.k.shape[0]} layers, stage has {self.num_layers}")
        if visible is not None and (visible.dtype != torch.bool or visible.shape != (n, cache.length + n)):
            raise ModelError(
                f"visible must be bool [{n}, {cache.length + n}], got {visible.dtype} {tuple(visible.shape)}"
            )


class LMHead(nn.Module):
    """hidden [n, H] (already final-normed by the last stage) -> logits [n, V] float32."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    @torch.inference_mode()
    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        anchor = next(t for t in (*self.parameters(), *self.buffers()) if t.is_floating_point())
        return self.lm_head(hidden.to(anchor.device, anchor.dtype)).float().cpu()
