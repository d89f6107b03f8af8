"""Where and in what number format a model part runs: a torch device, a compute dtype, weight-only quantization.

Validated once (CLI flag or peers-file option, then this frozen dataclass, then constructors). `auto` means
CUDA with float16 when a GPU is present, else the CPU in float32 (the exact format).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import final

import torch

from flowspec.errors import ConfigError
from flowspec.model.quant import DEFAULT_GROUP_SIZE, QUANT_MODES

__all__ = ["DEFAULT_GROUP_SIZE", "DTYPES", "GROUP_SIZES", "QUANTS", "Precision", "resolve_device"]

DTYPES = ("auto", "float32", "float16", "bfloat16")
QUANTS = QUANT_MODES
GROUP_SIZES = (32, 64, 128, 256)  # int4 group sizes the packed kernel takes


def resolve_device(spec: str = "auto") -> torch.device:
    """`auto`, `cpu`, `cuda` or `cuda:N`, checked against what this machine has."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"--device {spec!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {spec!r}: use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {spec}: this machine has no CUDA GPU (torch {torch.__version__}, "
                              "a CPU build?); use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {spec}: only {torch.cuda.device_count()} GPU(s) here")
    return device


@final
@dataclass(frozen=True, slots=True)
class Precision:
    """A resolved compute dtype and weight format (never `auto`)."""

    dtype: str = "float32"
    quant: str = "none"
    group_size: int = DEFAULT_GROUP_SIZE

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES[1:]:
            raise ConfigError(f"dtype {self.dtype!r}: use one of {', '.join(DTYPES)}")
        if self.quant not in QUANTS:
            raise ConfigError(f"quantization {self.quant!r}: use one of {', '.join(QUANTS)}")
        if self.group_size not in GROUP_SIZES:
            raise ConfigError(f"--group-size {self.group_size}: use 32, 64, 128 or 256")

    @classmethod
    def parse(cls, dtype: str = "auto", quant: str = "none", group_size: int = DEFAULT_GROUP_SIZE,
              device: torch.device | None = None) -> Precision:
        """Resolve `auto` for `device`: float16 on a GPU, float32 on the CPU (bfloat16 with quantized weights)."""
        if dtype not in DTYPES:
            raise ConfigError(f"--dtype {dtype!r}: use one of {', '.join(DTYPES)}")
        if dtype == "auto":  # quantized layers compute in bfloat16 anyway (quant.py): the rest follows them
            gpu = device is not None and device.type == "cuda"
            dtype = "float16" if gpu else "bfloat16" if quant != "none" else "float32"
        if quant != "none" and device is not None and device.type == "cuda":
            raise ConfigError(f"--quant {quant} runs on CPU stages (torch's packed CPU kernels); a GPU stage "
                              "runs --quant none in float16 or bfloat16")
        return cls(dtype, quant, group_size)

    @property
    def torch_dtype(self) -> torch.dtype:
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[self.dtype]

    @property
    def exact(self) -> bool:
        """float32 without quantization: token-identical to transformers' fp32 greedy decoding."""
        return self.dtype == "float32" and self.quant == "none"

    @property
    def tag(self) -> str:
        """A short name for folders and fingerprints: `float32`, `bfloat16`, `bfloat16-int4g64`."""
        if self.quant == "none":
            return self.dtype
        group = f"g{self.group_size}" if self.quant == "int4" else ""
        return f"{self.dtype}-{self.quant}{group}"

    @classmethod
    def from_tag(cls, tag: str) -> Precision:
        dtype, _, rest = tag.partition("-")
        if not rest:
            return cls(dtype)
        quant, _, group = rest.partition("g")
        return cls(dtype, quant, int(group) if group else DEFAULT_GROUP_SIZE)
