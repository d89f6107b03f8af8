"""Split a model into stage shards (settled once, offline) and read them back with their manifests checked.

Layout: `stage-0/` is the head D0 (lm_head only: the last stage applies the final norm, so D0 receives
post-norm hidden states); `stage-k/` for k = 1..N holds a contiguous block of layers, the embedding on stage 1
and the final norm on stage N. Each folder has `weights.safetensors` and `manifest.json`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from flowspec.errors import ConfigError, ModelError, ModelMismatch
from flowspec.model.config import ModelConfig
from flowspec.model.precision import Precision
from flowspec.model.quant import quantize_weight
from flowspec.model.stage import LMHead, StageModel
from flowspec.store.registry import cache_dir, model_fingerprint, model_name, resolve, sha256_file
from flowspec.store.weights import head_tensors, open_hf_weights, read_hf_config, stage_tensors

FORMAT_VERSION = 1
WEIGHTS = "weights.safetensors"
MANIFEST = "manifest.json"


def check_layer_count(num_stages: int, layers: Sequence[int]) -> None:
    """An explicit split has one layer count per stage."""
    if num_stages != len(layers):
        raise ConfigError(f"--stages {num_stages} but --layers has {len(layers)} numbers; give one per stage")


def plan_layers(num_layers: int, layers: list[int] | None, num_stages: int | None, model: str) -> list[int]:
    """Layer counts per stage: explicit, or balanced with the extra layers on earlier stages."""
    if layers is None:
        if not num_stages or num_stages < 1:
            raise ConfigError("give --stages N (at least 1) or an explicit --layers list")
        if num_stages > num_layers:
            raise ConfigError(f"{num_stages} stages but {model} has only {num_layers} layers; use at most {num_layers}")
        base, extra = divmod(num_layers, num_stages)
        return [base + (1 if i < extra else 0) for i in range(num_stages)]
    if num_stages is not None:
        check_layer_count(num_stages, layers)
    if any(n < 1 for n in layers):
        raise ConfigError(f"layers {','.join(map(str, layers))} has a stage with no layers; every stage needs >= 1")
    if sum(layers) != num_layers:
        raise ConfigError(
            f"layers {','.join(map(str, layers))} sum to {sum(layers)} but {model} has {num_layers} layers; "
            f"give {len(layers)} numbers that sum to {num_layers}"
        )
    return list(layers)


def _linear_bytes(out_features: int, in_features: int, precision: Precision) -> int:
    """Stored (and resident) bytes of one linear weight: quant.py's layouts, int8 plus a bfloat16 scale per row;
    int4 two per byte plus a bfloat16 scale and zero per group and row."""
    scale = 2
    if precision.quant == "int8":
        return out_features * in_features + out_features * scale
    if precision.quant == "int4":
        return out_features * in_features // 2 + 2 * scale * out_features * (in_features // precision.group_size)
    return out_features * in_features * precision.torch_dtype.itemsize


def plan_bytes(cfg: ModelConfig, counts: list[int], precision: Precision, context: int) -> list[dict[str, Any]]:
    """Per part (head, stage 1..N): weight bytes in `precision` and KV-cache bytes at `context` tokens."""
    h, item = cfg.hidden_size, precision.torch_dtype.itemsize
    qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
    layer = (_linear_bytes(qkv, h, precision) + _linear_bytes(h, cfg.num_heads * cfg.head_dim, precision)
             + _linear_bytes(2 * cfg.intermediate_size, h, precision) + _linear_bytes(h, cfg.intermediate_size, precision)
             + 2 * h * item + (qkv * item if cfg.attention_bias else 0))
    kv_per_layer = 2 * cfg.num_kv_heads * cfg.head_dim * context * item
    rows = [{"part": "head", "layers": 0, "weights": _linear_bytes(cfg.vocab_size, h, precision), "kv": 0}]
    for k, n in enumerate(counts, start=1):
        table = cfg.vocab_size * (h + 2) if precision.quant != "none" else cfg.vocab_size * h * item  # int8 rows
        extra = (table if k == 1 else 0) + (h * item if k == len(counts) else 0)
        rows.append({"part": f"stage {k}", "layers": n, "weights": n * layer + extra, "kv": n * kv_per_layer})
    return rows


def default_shard_dir(folder: Path, counts: list[int], cache: str | os.PathLike[str] | None,
                      precision: Precision = Precision()) -> Path:
    name = model_name(folder)
    if not (folder / "flowspec-model.json").is_file():
        name = f"{name}-{model_fingerprint(folder)[:8]}"  # path refs: keep same-named folders apart
    split = "-".join(map(str, counts))
    return cache_dir(cache) / "shards" / name / (split if precision.exact else f"{split}-{precision.tag}")


def linear_names(module: torch.nn.Module) -> set[str]:
    """Module paths of the nn.Linear layers: the weights that quantization converts (int8 or int4)."""
    return {name for name, m in module.named_modules() if isinstance(m, torch.nn.Linear)}


def embedding_names(module: torch.nn.Module) -> set[str]:
    """Module paths of the nn.Embedding tables: stored int8 per row under quantization."""
    return {name for name, m in module.named_modules() if isinstance(m, torch.nn.Embedding)}


def convert_tensors(tensors: dict[str, torch.Tensor], linears: set[str],
                    precision: Precision) -> dict[str, torch.Tensor]:
    """fp32 tensors in our layout -> the stored format: floats in the compute dtype, and with quantization each
    linear weight `NAME.weight` replaced by `quantize_weight`'s tensors stored as `NAME.<key>`."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        module, _, leaf = key.rpartition(".")
        if precision.quant != "none" and key == "embed.weight":
            for part, value in quantize_weight(tensor, "int8").items():
                out[f"embed.{part}"] = value
        elif precision.quant != "none" and leaf == "weight" and module in linears:
            for part, value in quantize_weight(tensor, precision.quant, precision.group_size).items():
                out[f"{module}.{part}"] = value
        else:
            out[key] = tensor.to(precision.torch_dtype) if tensor.is_floating_point() else tensor
    return out


def split_model(
    ref: str | os.PathLike[str],
    layers: list[int] | None = None,
    num_stages: int | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    precision: Precision = Precision(),
    progress: bool = False,
) -> Path:
    """Write stage-0..N shards of `ref`, already in `precision`'s format (a device never loads fp32 to convert),
    and return their parent folder (built in a temp dir, then renamed)."""
    folder = resolve(ref, cache_dir)
    cfg = read_hf_config(folder)
    name, fp = model_name(folder), model_fingerprint(folder)
    counts = plan_layers(cfg.num_layers, layers, num_stages, name)
    out = Path(out_dir) if out_dir else default_shard_dir(folder, counts, cache_dir, precision)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".split-{out.name}-", dir=out.parent))
    try:
        base = {"format_version": FORMAT_VERSION, "model": name, "fingerprint": fp, "num_stages": len(counts),
                "layers": counts, "dtype": precision.dtype, "quant": precision.quant,
                "group_size": precision.group_size, "config": cfg.to_dict()}
        from tqdm import tqdm

        bar = tqdm(total=len(counts) + 1, desc=f"split {name} ({precision.tag})", unit="shard",
                   disable=not progress)
        with torch.device("meta"):
            head_linears = linear_names(LMHead(cfg))
        with open_hf_weights(folder) as get:
            _write(tmp / "stage-0", convert_tensors(head_tensors(get, cfg), head_linears, precision),
                   {**base, "stage": 0, "layer_range": [0, 0], "has_embedding": False, "has_final_norm": False,
                    "has_lm_head": True})
            bar.update(1)
            start = 0
            for k, n in enumerate(counts, start=1):
                last = k == len(counts)
                with torch.device("meta"):
                    linears = linear_names(StageModel(cfg, start, start + n, k == 1, last))
                tensors = convert_tensors(stage_tensors(get, cfg, start, start + n, k == 1, last), linears,
                                          precision)
                _write(tmp / f"stage-{k}", tensors, {**base, "stage": k, "layer_range": [start, start + n],
                       "has_embedding": k == 1, "has_final_norm": last, "has_lm_head": False})
                start += n
                bar.update(1)
        bar.close()
        tmp.chmod(0o755)
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    except OSError as e:
        import errno

        if e.errno == errno.ENOSPC:
            need = sum(f.stat().st_size for f in folder.glob("*.safetensors")) * 1.1
            raise ModelError(f"disk full: need ~{need / 1e9:.1f} GB in {out.parent}") from e
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write(folder: Path, tensors: dict[str, torch.Tensor], manifest: dict[str, Any]) -> None:
    folder.mkdir()
    path = folder / WEIGHTS
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    manifest = {**manifest, "weights": WEIGHTS, "bytes": path.stat().st_size, "sha256": sha256_file(path)}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))


def ensure_shards(
    ref: str | os.PathLike[str], layers: list[int] | None = None, cache_dir: str | os.PathLike[str] | None = None,
    num_stages: int | None = None, precision: Precision = Precision(),
) -> Path:
    """The default shard folder for (ref, layers, precision): reused when complete and of the same model, else
    split."""
    folder = resolve(ref, cache_dir)
    cfg = read_hf_config(folder)
    counts = plan_layers(cfg.num_layers, layers, num_stages, model_name(folder))
    out = default_shard_dir(folder, counts, cache_dir, precision)
    try:
        fp = model_fingerprint(folder)
        if all(read_manifest(out / f"stage-{k}", expect_fingerprint=fp, expect_stage=k) for k in range(len(counts) + 1)):
            return out
    except ModelError:
        pass  # missing or stale: split again
    return split_model(folder, counts, None, out, cache_dir, precision)


def read_manifest(
    shard_dir: str | os.PathLike[str], expect_fingerprint: str | None = None, expect_stage: int | None = None
) -> dict[str, Any]:
    """Manifest of one stage folder, checked for format, file presence/size and the expected identity."""
    folder = Path(shard_dir)
    path = folder / MANIFEST
    if not path.is_file():
        raise ModelError(f"{folder} is not a shard: {MANIFEST} is missing; run: flowspec split")
    try:
        man = json.loads(path.read_text())
        ModelConfig.from_dict(man["config"])
        _ = man["stage"], man["layer_range"], man["sha256"], man["bytes"], man["fingerprint"]
    except (ValueError, KeyError, TypeError) as e:
        raise ModelError(f"{path} is corrupt ({e!r}); split the model again") from e
    if man.get("format_version") != FORMAT_VERSION:
        raise ModelMismatch(f"{path} has shard format {man.get('format_version')}, this flowspec reads "
                            f"{FORMAT_VERSION}; split the model again")
    if expect_fingerprint is not None and man["fingerprint"] != expect_fingerprint:
        raise ModelMismatch(f"{folder} belongs to model {man['model']} {man['fingerprint'][:12]}, expected "
                            f"fingerprint {expect_fingerprint[:12]}: shards from different models cannot be mixed")
    if expect_stage is not None and man["stage"] != expect_stage:
        raise ModelMismatch(f"{folder} is stage {man['stage']}, expected stage {expect_stage}")
    weights = folder / man.get("weights", WEIGHTS)
    if not weights.is_file():
        raise ModelError(f"{weights} is missing; split the model again")
    if weights.stat().st_size != man["bytes"]:
        raise ModelMismatch(f"{weights} is {weights.stat().st_size:,} bytes but its manifest says "
                            f"{man['bytes']:,} (truncated or replaced); split the model again")
    return man


def manifest_precision(man: dict[str, Any]) -> Precision:
    """The format a shard's weights are stored in (shards written before formats existed are float32)."""
    return Precision(str(man.get("dtype", "float32")), str(man.get("quant", "none")),
                     int(man.get("group_size", Precision().group_size)))


# hashing runs at >1 GB/s; below this size a full check costs well under a second
VERIFY_AUTO_LIMIT = 1 << 30


def verify_weights(shard_dir: str | os.PathLike[str], man: dict[str, Any], verify: bool | None = None) -> None:
    """sha256 of the weights vs the manifest. verify=None: only when the file is under VERIFY_AUTO_LIMIT."""
    path = Path(shard_dir) / man.get("weights", WEIGHTS)
    if verify is False or (verify is None and man["bytes"] > VERIFY_AUTO_LIMIT):
        return
    got = sha256_file(path)
    if got != man["sha256"]:
        raise ModelMismatch(f"{path} has sha256 {got[:12]}..., manifest says {man['sha256'][:12]}...: the shard "
                            "is corrupt; split the model again")
