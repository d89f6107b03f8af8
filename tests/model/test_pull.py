"""Pull errors are clear and never leave a half-written model; a good pull leaves a receipt."""

from __future__ import annotations

import errno
import hashlib
import json
from pathlib import Path

import pytest

from flowspec.errors import ModelError, ModelMismatch, ModelNotInstalled
from flowspec.store import pull as pull_mod
from flowspec.store.registry import REGISTRY, ModelSpec, list_models, resolve

PARTS = [b"GGUF" + bytes(range(200)), bytes(range(255, 0, -1)) * 3]


@pytest.fixture()
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ModelSpec:
    """A registered model whose two pieces live in importable fake packages."""
    site = tmp_path / "site"
    for i, blob in enumerate(PARTS, start=1):
        (site / f"fs_fake_part{i}" / "data").mkdir(parents=True)
        (site / f"fs_fake_part{i}" / "__init__.py").write_text("raise ImportError('must not be imported')\n")
        (site / f"fs_fake_part{i}" / "data" / f"part{i:02d}.bin").write_bytes(blob)
    monkeypatch.syspath_prepend(str(site))
    whole = b"".join(PARTS)
    spec = ModelSpec("fake-model", "test", ("fs-fake-part1==1", "fs-fake-part2==1"),
                     ("fs_fake_part1/data/part01.bin", "fs_fake_part2/data/part02.bin"),
                     len(whole), hashlib.sha256(whole).hexdigest())
    monkeypatch.setitem(REGISTRY, "fake-model", spec)
    return spec


def leftovers(cache: Path) -> list[str]:
    return sorted(p.name for p in (cache / "models").iterdir()) if (cache / "models").exists() else []


def test_bad_checksum_is_clear_and_leaves_nothing(fake: ModelSpec, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setitem(REGISTRY, "fake-model", ModelSpec(**{**fake.__dict__, "sha256": "0" * 64}))
    with pytest.raises(ModelMismatch, match="expected 0000.*reinstall"):
        pull_mod.pull("fake-model", tmp_path / "c", install=None)
    assert leftovers(tmp_path / "c") == []


def test_missing_file_and_missing_package(fake: ModelSpec, tmp_path: Path) -> None:
    (tmp_path / "site" / "fs_fake_part2" / "data" / "part02.bin").unlink()
    with pytest.raises(ModelNotInstalled, match="part02.bin is missing from package fs-fake-part2==1"):
        pull_mod.pull("fake-model", tmp_path / "c", install=None)
    assert leftovers(tmp_path / "c") == []
    asked: list[list[str]] = []
    (tmp_path / "site" / "fs_fake_part1" / "__init__.py").rename(tmp_path / "gone.py")
    (tmp_path / "site" / "fs_fake_part1").rename(tmp_path / "gone")
    with pytest.raises(ModelNotInstalled, match="package fs-fake-part1==1 is not installed"):
        pull_mod.pull("fake-model", tmp_path / "c", install=asked.append)
    assert asked == [["fs-fake-part1==1"]]  # it tried pip for exactly the missing package


def test_disk_full_message(fake: ModelSpec, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    def full(*_a: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pull_mod, "assemble", full)
    with pytest.raises(ModelError, match=r"disk full: need ~0\.0 GB in .*models"):
        pull_mod.pull("fake-model", tmp_path / "c", install=None)
    assert leftovers(tmp_path / "c") == []


def test_good_pull_is_atomic_with_receipt(fake: ModelSpec, tmp_path: Path, monkeypatch, tiny_factory) -> None:  # type: ignore[no-untyped-def]
    seen: list[bytes] = []

    def fake_convert(gguf: Path, out: Path) -> None:
        seen.append(gguf.read_bytes())
        tiny_factory(out, "llama", layers=1)

    monkeypatch.setattr(pull_mod, "convert", fake_convert)
    cache = tmp_path / "c"
    with pytest.raises(ModelError, match="models pull fake-model"):
        resolve("fake-model", cache)
    folder = pull_mod.pull("fake-model", cache, install=None)
    assert seen == [b"".join(PARTS)]
    assert leftovers(cache) == ["fake-model"] and not list(folder.glob("*.gguf"))
    receipt = json.loads((folder / "flowspec-model.json").read_text())
    assert receipt["name"] == "fake-model" and receipt["gguf_sha256"] == fake.sha256 and len(receipt["fingerprint"]) == 64
    assert resolve("fake-model", cache) == folder
    listed = {m["name"]: m for m in list_models(cache)}
    assert listed["fake-model"]["installed"] and not listed["smollm2-135m"]["installed"]
