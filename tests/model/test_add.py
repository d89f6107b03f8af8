"""`flowspec models add`: an HF folder or a GGUF file of a supported architecture is added under a name and runs
(a GGUF made here computes what transformers computes from the same file); other architectures, incomplete
folders and truncated or foreign files are refused with a message naming what is wrong, leaving nothing behind."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from flowspec.cli import main
from flowspec.errors import ModelError
from flowspec.store import list_models, load_full, load_tokenizer, resolve
from flowspec.store import pull as pull_mod
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


def _llama_order(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's permutation of q/k rows (convert_hf_to_gguf.py), which transformers' GGUF reader undoes."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path, arch: str = "llama", tokenizer: bool = True) -> dict[str, torch.Tensor]:
    """A llama.cpp-style GGUF of a random 2-layer Llama (untied lm_head; the MLP in Q8_0, the rest F32) with a
    byte-level BPE tokenizer (256 byte symbols + 4 merges + <|endoftext|>) in its metadata. Returns the HF
    state dict it was made from."""
    import gguf
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    merges = ["Ġ t", "h e", "Ġt he", "i n"]
    tokens = [*bytes_to_unicode().values(), *(m.replace(" ", "") for m in merges), "<|endoftext|>"]
    vocab, hidden, ffn, layers, heads, kv_heads = len(tokens), 64, 128, 2, 4, 2
    torch.manual_seed(11)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, tie_word_embeddings=False,
                      initializer_range=0.1)
    sd = LlamaForCausalLM(cfg).state_dict()
    for k in sd:
        if k.endswith("norm.weight"):  # not all ones, so a norm that is skipped or misplaced shows
            sd[k] = 1 + 0.1 * torch.randn_like(sd[k])
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny gguf")
    w.add_context_length(256)
    w.add_block_count(layers)
    w.add_feed_forward_length(ffn)
    w.add_embedding_length(hidden)
    w.add_rope_dimension_count(hidden // heads)
    w.add_rope_freq_base(10000.0)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    if tokenizer:
        w.add_tokenizer_model("gpt2")
        w.add_token_list(tokens)
        w.add_token_merges(merges)
        w.add_token_types([gguf.TokenType.NORMAL] * (vocab - 1) + [gguf.TokenType.CONTROL])
        w.add_bos_token_id(vocab - 1)
        w.add_eos_token_id(vocab - 1)

    def put(name: str, t: torch.Tensor, q8: bool = False) -> None:
        a = t.numpy()
        if q8:
            w.add_tensor(name, gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, a)

    put("token_embd.weight", sd["model.embed_tokens.weight"])
    put("output_norm.weight", sd["model.norm.weight"])
    put("output.weight", sd["lm_head.weight"])
    for i in range(layers):
        p = f"model.layers.{i}."
        put(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        put(f"blk.{i}.attn_q.weight", _llama_order(sd[p + "self_attn.q_proj.weight"], heads))
        put(f"blk.{i}.attn_k.weight", _llama_order(sd[p + "self_attn.k_proj.weight"], kv_heads))
        put(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        put(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        put(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        for part in ("gate", "up", "down"):
            put(f"blk.{i}.ffn_{part}.weight", sd[f"{p}mlp.{part}_proj.weight"], q8=True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return sd


def test_a_gguf_file_is_converted_and_computes_what_transformers_computes(tmp_path: Path) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = tmp_path / "src" / "tiny.gguf"
    gguf.parent.mkdir()
    sd = write_tiny_gguf(gguf)
    cache = tmp_path / "cache"
    assert main(["models", "add", str(gguf), "--name", "tiny-gguf", "--cache-dir", str(cache)]) == 0
    folder = resolve("tiny-gguf", cache)
    assert json.loads((folder / "flowspec-model.json").read_text())["source"] == str(gguf.resolve())
    assert [m["name"] for m in list_models(cache) if m["installed"]] == ["tiny-gguf"]
    assert not list(folder.glob("*.gguf")) and sorted(p.name for p in (cache / "models").iterdir()) == ["tiny-gguf"]
    # llama.cpp's q/k row order is undone: the F32 attention weights are the originals, bit for bit
    converted = load_file(str(next(folder.glob("*.safetensors"))))
    for k in ("model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight"):
        assert torch.equal(converted[k], sd[k]), k

    ref = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    ref_tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    text = "the thing in the tin"
    ids = load_tokenizer("tiny-gguf", cache).encode(text)
    assert ids == ref_tok.encode(text) and len(ids) > 5
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0]
    model, head = load_full("tiny-gguf", cache)
    kv = model.new_cache(32)
    n = len(ids) - 2  # a prefill, then two single-token steps through the KV cache
    got = [head.forward(model.forward(torch.tensor(ids[:n]), torch.arange(n), kv))]
    for i in (n, n + 1):
        got.append(head.forward(model.forward(torch.tensor([ids[i]]), torch.tensor([i]), kv)))
    torch.testing.assert_close(torch.cat(got), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(torch.cat(got).argmax(-1), expected.argmax(-1))


@pytest.mark.parametrize("arch", ["gpt2", "falcon"])
def test_a_gguf_of_another_architecture_is_refused_by_name(tmp_path: Path, arch: str, capsys) -> None:  # type: ignore[no-untyped-def]
    gguf = tmp_path / f"{arch}.gguf"
    write_tiny_gguf(gguf, arch=arch)
    cache = tmp_path / "cache"
    assert main(["models", "add", str(gguf), "--name", "other", "--cache-dir", str(cache)]) == 2
    err = capsys.readouterr().err
    assert f"GGUF architecture '{arch}' is not supported; flowspec runs llama, qwen2, mistral" in err, err
    assert "converting" not in err  # refused from the header, before any conversion
    assert not (cache / "models").exists() or not list((cache / "models").iterdir())


def test_truncated_foreign_or_tokenizerless_ggufs_are_refused_clearly(tmp_path: Path) -> None:
    good = tmp_path / "good.gguf"
    write_tiny_gguf(good)
    blob = good.read_bytes()
    cache = tmp_path / "cache"
    cases = {
        "cut.gguf": (blob[: len(blob) // 2], rf"truncated GGUF: {len(blob) // 2:,} bytes, but its 21 tensors need "
                                             rf"{len(blob):,}; copy or download it again"),
        "header.gguf": (blob[:2000], r"truncated GGUF: the file \(2,000 bytes\) ends inside its header"),
        "stub.gguf": (blob[:10], "10 bytes is too short for a GGUF file"),
        "text.gguf": (b"not a model, just text\n" * 10, "not a GGUF file"),
    }
    for name, (data, message) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ModelError, match=message):
            add_model(tmp_path / name, "x", cache)
    write_tiny_gguf(tmp_path / "notok.gguf", tokenizer=False)
    with pytest.raises(ModelError, match=r"no tokenizer \(tokenizer.ggml.tokens\)"):
        add_model(tmp_path / "notok.gguf", "x", cache)
    assert not (cache / "models").exists() or not list((cache / "models").iterdir())


def test_disk_full_while_converting_is_clear_and_leaves_nothing(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import errno

    gguf = tmp_path / "tiny.gguf"
    write_tiny_gguf(gguf)

    def full(src: Path, out: Path) -> None:
        (out / "model.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pull_mod, "convert", full)
    cache = tmp_path / "cache"
    with pytest.raises(ModelError, match=r"disk full: need ~0\.0 GB in .*models"):
        add_model(gguf, "tiny", cache)
    assert list((cache / "models").iterdir()) == []
