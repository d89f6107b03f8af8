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
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from flowspec.errors import ConfigError, ModelError, ModelMismatch
from flowspec.model.config import ModelConfig
from flowspec.store.registry import cache_dir, model_fingerprint, model_name, resolve, sha256_file
from flowspec.store.weights import head_tensors, open_hf_weights, read_hf_config, stage_tensors

FORMAT_VERSION = 1
WEIGHTS = "weights.safetensors"
MANIFEST = "manifest.json"


def plan_layers(num_layers: int, layers: list[int] | None, num_stages: int | None, model: str) -> list[int]:
    """Layer counts per stage: explicit, or balanced with the extra layers on earlier stages."""
    if layers is None:
        if not num_stages or num_stages < 1:
            raise ConfigError("give --stages N (at least 1) or an explicit --layers list")
        if num_stages > num_layers:
            raise ConfigError(f"{num_stages} stages but {model} has only {num_layers} layers; use at most {num_layers}")
        base, extra = divmod(num_layers, num_stages)
        return [base + (1 if i < extra else 0) for i in range(num_stages)]
    if num_stages is not None and num_stages != len(layers):
        raise ConfigError(f"--stages {num_stages} but --layers has {len(layers)} numbers; give one per stage")
    if any(n < 1 for n in layers):
        raise ConfigError(f"layers {','.join(map(str, layers))} has a stage with no layers; every stage needs >= 1")
    if sum(layers) != num_layers:
        raise ConfigError(
            f"layers {','.join(map(str, layers))} sum to {sum(layers)} but {model} has {num_layers} layers; "
            f"give {len(layers)} numbers that sum to {num_layers}"
        )
    return list(layers)


def default_shard_dir(folder: Path, counts: list[int], cache: str | os.PathLike[str] | None) -> Path:
    name = model_name(folder)
    if not (folder / "flowspec-model.json").is_file():
        name = f"{name}-{model_fingerprint(folder)[:8]}"  # path refs: keep same-named folders apart
    return cache_dir(cache) / "shards" / name / "-".join(map(str, counts))


def split_model(
    ref: str | os.PathLike[str],
    layers: list[int] | None = None,
    num_stages: int | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Write stage-0..N shards of `ref` and return their parent folder (built in a temp dir, then renamed)."""
    folder = resolve(ref, cache_dir)
    cfg = read_hf_config(folder)
    name, fp = model_name(folder), model_fingerprint(folder)
    counts = plan_layers(cfg.num_layers, layers, num_stages, name)
    out = Path(out_dir) if out_dir else default_shard_dir(folder, counts, cache_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".split-{out.name}-", dir=out.parent))
    try:
        base = {"format_version": FORMAT_VERSION, "model": name, "fingerprint": fp,
                "num_stages": len(counts), "layers": counts, "dtype": "float32", "config": cfg.to_dict()}
        with open_hf_weights(folder) as get:
            _write(tmp / "stage-0", head_tensors(get, cfg), {**base, "stage": 0, "layer_range": [0, 0],
                   "has_embedding": False, "has_final_norm": False, "has_lm_head": True})
            start = 0
            for k, n in enumerate(counts, start=1):
                last = k == len(counts)
                tensors = stage_tensors(get, cfg, start, start + n, k == 1, last)
                _write(tmp / f"stage-{k}", tensors, {**base, "stage": k, "layer_range": [start, start + n],
                       "has_embedding": k == 1, "has_final_norm": last, "has_lm_head": False})
                start += n
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
    num_stages: int | None = None,
) -> Path:
    """The default shard folder for (ref, layers): reused when complete and of the same model, else split."""
    folder = resolve(ref, cache_dir)
    cfg = read_hf_config(folder)
    counts = plan_layers(cfg.num_layers, layers, num_stages, model_name(folder))
    out = default_shard_dir(folder, counts, cache_dir)
    try:
        fp = model_fingerprint(folder)
        if all(read_manifest(out / f"stage-{k}", expect_fingerprint=fp, expect_stage=k) for k in range(len(counts) + 1)):
            return out
    except ModelError:
        pass  # missing or stale: split again
    return split_model(folder, counts, None, out, cache_dir)


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
