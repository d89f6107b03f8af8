"""Weight-only quantized linear layers on torch's own packed CPU kernels (no matmul of ours).

Stored format (portable, what a shard holds; `quantize_weight` makes it from an fp32 weight [out, in]):

* int8: `weight_int8` [out, in] int8 and `scales` [out] bfloat16, symmetric per output row: w ≈ q · scale.
* int4: `weight_uint4x2` [out, in/2] uint8 (column 2j in the low nibble, 2j+1 in the high one) and
  `scales_and_zeros` [in/group, out, 2] bfloat16, asymmetric per group of `group` inputs of a row:
  w ≈ (q - 8) · scale + zero, q in 0..15 (gpt-fast's layout, which `_weight_int4pack_mm_for_cpu` takes).

At load the int4 nibbles are packed for this CPU (`_convert_weight_to_int4pack_for_cpu`). Both kernels run fast
only with bfloat16 activations (fp32 activations take a slow path: 25 ms instead of 0.8 ms below), so a layer
casts its input to bfloat16 and its output back. Measured on this 2-core AVX2 machine, one thread, a
1536 → 8960 projection (Qwen2.5-1.5B's MLP), ms per call for 1 / 16 rows:

    fp32 4.2 / 16.7    bf16 3.6 / 4.9    int8 1.9 / 10.0    int4 g32 0.89 / 6.3, g64 0.77 / 6.2, g128 0.84 / 6.2

with relative output errors on Gaussian weights of int8 0.8 %, int4 g32 7.7 %, g64 8.8 %, g128 10 %: group 64 is
the fastest for one row (a decode step) at close to g32's error, hence the default.
"""

from __future__ import annotations

import torch
from torch import nn

from flowspec.errors import ModelError

__all__ = ["DEFAULT_GROUP_SIZE", "QUANT_MODES", "Int4Linear", "Int8Embedding", "Int8Linear", "quantize_module",
           "quantize_weight", "quantized_linear"]

QUANT_MODES = ("none", "int8", "int4")
DEFAULT_GROUP_SIZE = 64  # measured above: fastest single-row int4 kernel, error close to group 32's
_INNER_K_TILES = 2  # the CPU packing's tile parameter (2, 4 and 8 measured the same here)
_ACT = torch.bfloat16  # the kernels' fast activation dtype
_ALIGN = 64  # bytes: the packed kernels crash on inputs that start elsewhere (a tensor viewing a wire frame)


def _kernel_input(x: torch.Tensor) -> torch.Tensor:
    """`x` in the kernels' dtype, contiguous, in memory of its own that starts on a 64-byte boundary."""
    x = x.to(_ACT).contiguous()
    return x if x.data_ptr() % _ALIGN == 0 else x.clone()


def quantize_weight(weight: torch.Tensor, mode: str, group_size: int = DEFAULT_GROUP_SIZE) -> dict[str, torch.Tensor]:
    """The stored tensors of a float weight [out, in] (see the module docstring)."""
    w = weight.detach().float()
    out_f, in_f = w.shape
    if mode == "int8":
        scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)  # [out]
        q = torch.round(w / scales[:, None]).clamp(-128, 127).to(torch.int8)
        return {"weight_int8": q, "scales": scales.to(_ACT)}
    if mode == "int4":
        _check_int4(out_f, in_f, group_size)
        groups = w.reshape(out_f, in_f // group_size, group_size)  # [out, in/g, g]
        lo, hi = groups.amin(dim=-1, keepdim=True), groups.amax(dim=-1, keepdim=True)
        scales = ((hi - lo) / 15).clamp(min=1e-12)
        q = torch.round((groups - lo) / scales).clamp(0, 15).to(torch.uint8).reshape(out_f, in_f)
        zeros = lo + 8 * scales  # so that w ≈ (q - 8) · scale + zero
        sz = torch.cat([scales, zeros], dim=-1).transpose(0, 1).contiguous()  # [in/g, out, 2]
        return {"weight_uint4x2": q[:, 0::2] | (q[:, 1::2] << 4), "scales_and_zeros": sz.to(_ACT)}
    raise ModelError(f"unknown quantization {mode!r}; use one of {', '.join(QUANT_MODES[1:])}")


def _check_int4(out_f: int, in_f: int, group_size: int) -> None:
    if in_f % group_size or in_f % (_INNER_K_TILES * 16) or out_f % 16:
        raise ModelError(f"a [{out_f}, {in_f}] linear cannot be int4-packed with group {group_size}: in_features "
                         f"must be a multiple of the group size and of {_INNER_K_TILES * 16}, out_features of 16; "
                         "use --quant int8 (or another --group-size)")


class Int8Linear(nn.Module):
    """y = x Wᵀ (+ b) with W int8 per-row scaled: `_weight_int8pack_mm`."""

    def __init__(self, weight_int8: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight_int8.shape
        # a fresh, aligned copy: the kernel crashes on a tensor that views a safetensors file's buffer
        self.register_buffer("weight_int8", weight_int8.clone())  # [out, in] int8
        self.register_buffer("scales", scales.to(_ACT, copy=True))  # [out]
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [n, in] -> [n, out]
        scales = self.scales if self.scales.dtype == _ACT else self.scales.to(_ACT)  # a module .to() cast it
        y = torch.ops.aten._weight_int8pack_mm(_kernel_input(x), self.weight_int8, scales).to(x.dtype)
        return y + self.bias.to(x.dtype) if self.bias is not None else y


class Int4Linear(nn.Module):
    """y = x Wᵀ (+ b) with W int4 group-wise: `_weight_int4pack_mm_for_cpu` on weights packed at load."""

    def __init__(self, weight_uint4x2: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int,
                 bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, half = weight_uint4x2.shape
        self.in_features, self.group_size = 2 * half, group_size
        _check_int4(self.out_features, self.in_features, group_size)
        q = torch.empty(self.out_features, self.in_features, dtype=torch.int32)
        q[:, 0::2], q[:, 1::2] = weight_uint4x2 & 0x0F, weight_uint4x2 >> 4
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, _INNER_K_TILES))
        self.register_buffer("scales_and_zeros", scales_and_zeros.to(_ACT, copy=True))  # [in/g, out, 2]
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [n, in] -> [n, out]
        sz = self.scales_and_zeros if self.scales_and_zeros.dtype == _ACT else self.scales_and_zeros.to(_ACT)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(_kernel_input(x), self.packed, self.group_size,
                                                       sz).to(x.dtype)
        return y + self.bias.to(x.dtype) if self.bias is not None else y


class Int8Embedding(nn.Module):
    """A token table stored int8 per row (scale per row, like Int8Linear's weight); a lookup dequantizes only
    the rows it reads. The embedding is a stage's largest tensor (151,936 x 1,536 for Qwen2.5-1.5B)."""

    def __init__(self, weight_int8: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight_int8.shape
        self.weight_int8: torch.Tensor  # [V, H] int8
        self.scales: torch.Tensor  # [V]
        self.register_buffer("weight_int8", weight_int8.clone())
        self.register_buffer("scales", scales.to(dtype, copy=True))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # [n] -> [n, H]
        return self.weight_int8[ids].to(self.scales.dtype) * self.scales[ids, None]


def quantized_linear(tensors: dict[str, torch.Tensor], mode: str, group_size: int,
                     bias: torch.Tensor | None) -> nn.Module:
    """The runtime layer from stored tensors (KeyError when a part is missing)."""
    if mode == "int8":
        return Int8Linear(tensors["weight_int8"], tensors["scales"], bias)
    if mode == "int4":
        return Int4Linear(tensors["weight_uint4x2"], tensors["scales_and_zeros"], group_size, bias)
    raise ModelError(f"unknown quantization {mode!r}; use one of {', '.join(QUANT_MODES[1:])}")


def quantize_module(module: nn.Module, mode: str, group_size: int = DEFAULT_GROUP_SIZE,
                    dtype: torch.dtype = _ACT) -> nn.Module:
    """Replace every nn.Linear inside `module` (in place) by its quantized layer, and every nn.Embedding by an
    int8 table whose lookups come out in `dtype`; returns `module`."""
    for name, child in list(module.named_modules()):
        if isinstance(child, nn.Embedding) and name:
            parts = quantize_weight(child.weight, "int8")
            module.set_submodule(name, Int8Embedding(parts["weight_int8"], parts["scales"], dtype))
        elif isinstance(child, nn.Linear):
            bias = child.bias.detach() if child.bias is not None else None
            layer = quantized_linear(quantize_weight(child.weight, mode, group_size), mode, group_size, bias)
            if name:
                module.set_submodule(name, layer)
            else:
                raise ModelError("quantize_module takes a module that contains linears, not a bare nn.Linear")
    return module
