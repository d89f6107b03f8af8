"""Transformer building blocks in the op order of transformers' Llama/Qwen2 code, so fp32 numerics match."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flowspec.model.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [n, H] -> [n, H]
        dtype = x.dtype
        h = x.to(torch.float32)  # normalise in fp32 whatever the compute dtype (as HF does)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class RoPE(nn.Module):
    """cos/sin for explicit absolute positions; rotate_half layout (HF), not interleaved pairs."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        self.inv_freq: torch.Tensor  # [d/2]
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[:, None].float() * self.inv_freq  # [n, d/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [n, d]
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin  # x [h, n, d], cos/sin [n, d]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.nh, self.nkv, self.hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        # q, k and v fused into one matmul (rows: q | k | v), settled once at split time
        self.wqkv = nn.Linear(cfg.hidden_size, (self.nh + 2 * self.nkv) * self.hd, bias=cfg.attention_bias)
        self.wo = nn.Linear(self.nh * self.hd, cfg.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,  # [n, H]
        rope: tuple[torch.Tensor, torch.Tensor],  # cos, sin [n, d]
        k_cache: torch.Tensor,  # [kv_heads, capacity, d], this layer's slice
        v_cache: torch.Tensor,
        start: int,  # first free slot
        mask: torch.Tensor | None,  # bool [n, start + n] or None (all visible)
    ) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.wqkv(x).split([self.nh * self.hd, self.nkv * self.hd, self.nkv * self.hd], dim=-1)
        q = q.view(n, self.nh, self.hd).transpose(0, 1)  # [nh, n, d]
        k = k.view(n, self.nkv, self.hd).transpose(0, 1)  # [nkv, n, d]
        v = v.view(n, self.nkv, self.hd).transpose(0, 1)
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k_cache[:, start : start + n] = k
        v_cache[:, start : start + n] = v
        keys = k_cache[None, :, : start + n]  # [1, nkv, start+n, d]
        vals = v_cache[None, :, : start + n]
        out = F.scaled_dot_product_attention(
            q[None], keys, vals, attn_mask=None if mask is None else mask[None, None], enable_gqa=self.nkv != self.nh
        )  # [1, nh, n, d]
        return self.wo(out[0].transpose(0, 1).reshape(n, self.nh * self.hd))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.inter = cfg.intermediate_size
        self.w_gate_up = nn.Linear(cfg.hidden_size, 2 * self.inter, bias=False)  # rows: gate | up
        self.w_down = nn.Linear(self.inter, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [n, H] -> [n, H]
        gate, up = self.w_gate_up(x).split(self.inter, dim=-1)
        return self.w_down(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        start: int,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:  # [n, H] -> [n, H]
        x = x + self.attn(self.attn_norm(x), rope, k_cache, v_cache, start, mask)
        return x + self.mlp(self.mlp_norm(x))
