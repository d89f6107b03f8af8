"""`flowspec models add`: an HF folder of a supported architecture is copied in under a name and runs; other
architectures and incomplete folders are refused with a message naming what is missing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from flowspec.cli import main
from flowspec.errors import ModelError
from flowspec.store import list_models, load_full, resolve
from flowspec.store.pull import add_model
from tests.model.test_precision import tiny_llama


def _with_tokenizer(folder: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(128)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", eos_token="t1").save_pretrained(folder)
    return folder


def test_an_hf_folder_is_added_under_its_name_and_runs(tmp_path: Path) -> None:
    src = _with_tokenizer(tiny_llama(tmp_path / "src"))
    cache = tmp_path / "cache"
    folder = add_model(src, "tiny", cache)
    assert resolve("tiny", cache) == folder and (folder / "flowspec-model.json").is_file()
    listed = next(m for m in list_models(cache) if m["name"] == "tiny")
    assert listed["installed"] is True and listed["path"] == str(folder)
    model, head = load_full("tiny", cache)
    logits = head.forward(model.forward(torch.tensor([3, 4, 5]), torch.arange(3), model.new_cache(8)))
    assert logits.shape == (3, 128) and torch.isfinite(logits).all()
    with pytest.raises(ModelError, match="already"):
        add_model(src, "tiny", cache)
    assert main(["models", "add", str(src), "--name", "tiny", "--force", "--cache-dir", str(cache)]) == 0


def test_unsupported_or_incomplete_models_are_refused_by_name(tmp_path: Path) -> None:
    src = _with_tokenizer(tiny_llama(tmp_path / "src"))
    gpt2 = tmp_path / "gpt2"
    shutil.copytree(src, gpt2)
    cfg = json.loads((gpt2 / "config.json").read_text())
    (gpt2 / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(ModelError, match="model_type 'gpt2' is not supported"):
        add_model(gpt2, "g", tmp_path / "cache")
    broken = tmp_path / "broken"
    shutil.copytree(src, broken)
    from safetensors.torch import load_file, save_file

    weights = next(broken.glob("*.safetensors"))
    tensors = load_file(str(weights))
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, str(weights), metadata={"format": "pt"})
    with pytest.raises(ModelError, match="model.layers.1.mlp.down_proj.weight"):
        add_model(broken, "b", tmp_path / "cache")
    with pytest.raises(ModelError, match="not a .gguf"):
        add_model(weights, "w", tmp_path / "cache")
    assert not (tmp_path / "cache" / "models" / "b").exists(), "a refused model left a folder behind"
    assert main(["models", "add", str(tmp_path / "nope"), "--name", "x", "--cache-dir", str(tmp_path)]) == 2
