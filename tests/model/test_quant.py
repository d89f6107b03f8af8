"""Weight-only int8/int4 layers on torch's packed CPU kernels: bounded error, the same numbers as dequantizing
the stored format by hand, bias, bytes, clear errors, and whole-module conversion."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from flowspec.errors import ModelError
from flowspec.model.quant import Int4Linear, Int8Linear, quantize_module, quantize_weight, quantized_linear


def _dequantize(tensors: dict[str, torch.Tensor], mode: str, group: int) -> torch.Tensor:
    """The stored format read back by hand, as the module docstring defines it."""
    if mode == "int8":
        return tensors["weight_int8"].float() * tensors["scales"].float()[:, None]
    packed = tensors["weight_uint4x2"]
    q = torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(packed.shape[0], -1).float()
    sz = tensors["scales_and_zeros"].float().transpose(0, 1)  # [out, in/g, 2]
    scale, zero = sz[..., 0].repeat_interleave(group, 1), sz[..., 1].repeat_interleave(group, 1)
    return (q - 8) * scale + zero


@pytest.mark.parametrize(("mode", "group", "bound"), [("int8", 64, 0.015), ("int4", 32, 0.09), ("int4", 64, 0.10),
                                                      ("int4", 128, 0.12)])
def test_error_is_bounded_and_the_kernel_equals_the_stored_format(mode: str, group: int, bound: float) -> None:
    torch.manual_seed(1)
    w, b = torch.randn(384, 256), torch.randn(384)
    tensors = quantize_weight(w, mode, group)
    layer = quantized_linear(tensors, mode, group, b)
    for rows in (1, 7, 16):
        x = torch.randn(rows, 256)
        y = layer(x)
        assert y.dtype == x.dtype and y.shape == (rows, 384)
        exact = x @ w.T + b
        assert ((y - exact).norm() / exact.norm()).item() < bound
        by_hand = x.bfloat16().float() @ _dequantize(tensors, mode, group).T + b
        assert torch.allclose(y, by_hand, rtol=2e-2, atol=2e-2 * by_hand.abs().max().item())


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 6), st.integers(1, 4), st.sampled_from([32, 64]), st.sampled_from(["int8", "int4"]))
def test_any_packable_shape_round_trips(out_sixteenths: int, in_blocks: int, group: int, mode: str) -> None:
    out_f, in_f = 16 * out_sixteenths, max(group, 32) * in_blocks
    w = torch.randn(out_f, in_f)
    layer = quantized_linear(quantize_weight(w, mode, group), mode, group, None)
    x = torch.randn(3, in_f)
    rel = ((layer(x) - x @ w.T).norm() / (x @ w.T).norm()).item()
    assert rel < (0.02 if mode == "int8" else 0.15)


def test_int4_weights_take_a_sixth_of_fp32_or_less() -> None:
    w = torch.randn(8960, 1536)
    stored = quantize_weight(w, "int4", 64)
    assert sum(t.nbytes for t in stored.values()) <= w.nbytes / 6
    assert sum(t.nbytes for t in quantize_weight(w, "int8").values()) <= w.nbytes / 3.9


def test_bad_input_is_refused_clearly() -> None:
    with pytest.raises(ModelError, match=r"\[64, 100\] linear cannot be int4-packed"):
        quantize_weight(torch.randn(64, 100), "int4", 32)
    with pytest.raises(ModelError, match="unknown quantization 'int3'"):
        quantize_weight(torch.randn(8, 32), "int3")
    with pytest.raises(KeyError):
        quantized_linear({"scales": torch.ones(8)}, "int8", 64, None)


def test_quantize_module_replaces_every_linear() -> None:
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(64, 128), nn.SiLU(), nn.Linear(128, 64, bias=False))
    x = torch.randn(4, 64)
    want = net(x)
    for mode, layer_type in (("int8", Int8Linear), ("int4", Int4Linear)):
        q = quantize_module(_copy(net), mode, 32)
        assert [type(m) for m in q] == [layer_type, nn.SiLU, layer_type]
        assert ((q(x) - want).norm() / want.norm()).item() < (0.02 if mode == "int8" else 0.15)


def _copy(net: nn.Sequential) -> nn.Sequential:
    import copy

    return copy.deepcopy(net)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_inputs_viewing_unaligned_memory_are_safe(mode: str) -> None:
    """Hidden states decoded from a wire frame view the frame's bytes at any offset: the packed kernels crashed
    on them (a segfault in the head's lm_head); the layer copies such inputs first."""
    w = torch.randn(256, 128)
    layer = quantized_linear(quantize_weight(w, mode, 32), mode, 32, None)
    x = torch.randn(3, 128).bfloat16()
    raw = bytes(2) + x.view(torch.uint8).numpy().tobytes()  # 2 bytes in: aligned for bf16, not for AVX loads
    view = torch.frombuffer(bytearray(raw), dtype=torch.bfloat16, offset=2).reshape(3, 128)
    assert view.data_ptr() % 64 and torch.equal(view, x)
    assert torch.equal(layer(view), layer(x))
