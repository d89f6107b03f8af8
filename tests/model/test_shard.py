"""Splitting: layer plans, manifests, and clear errors for corrupt or mismatched shards."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from flowspec.errors import ConfigError, ModelError, ModelMismatch
from flowspec.store.load import load_head, load_stage
from flowspec.store.registry import model_fingerprint
from flowspec.store.shard import ensure_shards, plan_layers, split_model


def test_plan_layers() -> None:
    assert plan_layers(30, None, 4, "m") == [8, 8, 7, 7]
    assert plan_layers(5, None, 5, "m") == [1, 1, 1, 1, 1]
    assert plan_layers(30, [10, 10, 10], None, "m") == [10, 10, 10]
    with pytest.raises(ConfigError, match="sum to 25 but m has 30 layers; give 3 numbers that sum to 30"):
        plan_layers(30, [10, 10, 5], None, "m")
    with pytest.raises(ConfigError, match="no layers"):
        plan_layers(30, [30, 0], None, "m")
    with pytest.raises(ConfigError, match="only 5 layers"):
        plan_layers(5, None, 6, "m")


def test_manifest_contents(tiny_qwen2: Path, tmp_path: Path) -> None:
    out = split_model(tiny_qwen2, [3, 2], out_dir=tmp_path / "s")
    fp = model_fingerprint(tiny_qwen2)
    mans = [json.loads((out / f"stage-{k}" / "manifest.json").read_text()) for k in range(3)]
    assert [m["layer_range"] for m in mans] == [[0, 0], [0, 3], [3, 5]]
    assert [(m["has_embedding"], m["has_final_norm"], m["has_lm_head"]) for m in mans] == [
        (False, False, True), (True, False, False), (False, True, False)]
    assert all(m["fingerprint"] == fp and m["num_stages"] == 2 and m["config"]["arch"] == "qwen2" for m in mans)
    assert not list(tmp_path.glob(".split-*"))  # temp folder renamed away


def test_ensure_shards_reuses(tiny_llama: Path, tmp_path: Path) -> None:
    a = ensure_shards(tiny_llama, [2, 3], cache_dir=tmp_path)
    assert a.parent.parent == tmp_path / "shards" and a.name == "2-3"
    stamp = (a / "stage-1" / "weights.safetensors").stat().st_mtime_ns
    assert ensure_shards(tiny_llama, [2, 3], cache_dir=tmp_path) == a
    assert (a / "stage-1" / "weights.safetensors").stat().st_mtime_ns == stamp
    (a / "stage-2" / "weights.safetensors").unlink()
    assert ensure_shards(tiny_llama, [2, 3], cache_dir=tmp_path) == a  # damaged: split again
    load_stage(a / "stage-2")


@pytest.fixture()
def shards(tiny_llama: Path, tmp_path: Path) -> Path:
    return split_model(tiny_llama, None, 2, out_dir=tmp_path / "s")


def test_wrong_fingerprint_or_stage(shards: Path, tiny_qwen2: Path) -> None:
    with pytest.raises(ModelMismatch, match="shards from different models"):
        load_stage(shards / "stage-1", expect_fingerprint=model_fingerprint(tiny_qwen2))
    with pytest.raises(ModelMismatch, match="is stage 2, expected stage 1"):
        load_stage(shards / "stage-2", expect_stage=1)
    with pytest.raises(ModelError, match="use load_head"):
        load_stage(shards / "stage-0")


def test_missing_and_truncated_files(shards: Path) -> None:
    (shards / "stage-1" / "weights.safetensors").unlink()
    with pytest.raises(ModelError, match="weights.safetensors is missing"):
        load_stage(shards / "stage-1")
    w = shards / "stage-2" / "weights.safetensors"
    w.write_bytes(w.read_bytes()[:-100])
    with pytest.raises(ModelMismatch, match="truncated or replaced"):
        load_stage(shards / "stage-2")
    (shards / "stage-0" / "manifest.json").write_text("{not json")
    with pytest.raises(ModelError, match="corrupt"):
        load_head(shards / "stage-0")
    shutil.rmtree(shards / "stage-0")
    with pytest.raises(ModelError, match="manifest.json is missing"):
        load_head(shards / "stage-0")


def test_flipped_byte_caught_by_sha(shards: Path) -> None:
    w = shards / "stage-1" / "weights.safetensors"
    data = bytearray(w.read_bytes())
    data[-5] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(ModelMismatch, match="sha256"):
        load_stage(shards / "stage-1")
    load_stage(shards / "stage-1", verify=False)  # the escape hatch skips hashing


def test_garbage_weights_of_right_size(shards: Path) -> None:
    w = shards / "stage-1" / "weights.safetensors"
    w.write_bytes(b"\xff" * w.stat().st_size)
    with pytest.raises(ModelError, match="corrupt"):
        load_stage(shards / "stage-1", verify=False)


@pytest.mark.slow
def test_smollm2_bad_split_refused(smollm2: Path) -> None:
    with pytest.raises(ConfigError, match="layers 10,10,5 sum to 25 but smollm2-135m has 30 layers"):
        split_model("smollm2-135m", [10, 10, 5])


def test_atomic_dir_replaces_whole_or_leaves_the_old(tmp_path: Path) -> None:
    from flowspec.store.atomic import atomic_dir

    final = tmp_path / "cache" / "thing"
    with atomic_dir(final, 1e9, "job") as tmp:
        assert tmp.parent == final.parent and tmp.name.startswith(".job-thing-") and not final.exists()
        (tmp / "a").write_text("new")
    assert [p.name for p in final.parent.iterdir()] == ["thing"] and (final / "a").read_text() == "new"
    assert final.stat().st_mode & 0o777 == 0o755  # readable like any cache entry, not mkdtemp's 0o700
    with pytest.raises(RuntimeError, match="boom"), atomic_dir(final, 1e9, "job") as tmp:
        (tmp / "a").write_text("half")
        raise RuntimeError("boom")
    assert [p.name for p in final.parent.iterdir()] == ["thing"] and (final / "a").read_text() == "new"


def test_disk_full_while_splitting_says_what_is_needed_and_leaves_nothing(tiny_llama: Path, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import errno
    from collections import namedtuple

    from flowspec.store import atomic, shard

    written: list[str] = []

    def full(tensors: object, path: str) -> None:
        Path(path).write_bytes(b"partial")
        written.append(path)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shard, "save_file", full)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda path: usage(10**10, 10**10 - 123_000_000, 123_000_000))
    need = sum(f.stat().st_size for f in tiny_llama.glob("*.safetensors")) * 1.1
    out = tmp_path / "shards" / "s"
    with pytest.raises(ModelError, match=rf"disk full: need ~{need / 1e9:.1f} GB in {out.parent}, 0\.1 GB free"):
        split_model(tiny_llama, [2, 3], out_dir=out)
    assert written and list((tmp_path / "shards").iterdir()) == []
