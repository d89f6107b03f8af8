"""Number formats end to end on a tiny random llama: shards are written already converted (bfloat16, int8,
int4) with the format in the manifest, the plan predicts their bytes, stages load and compute in the format,
deployments in different formats never share a fingerprint, and peers-file options are validated."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from flowspec.config import parse_peers
from flowspec.errors import ConfigError
from flowspec.model.precision import Precision, resolve_device
from flowspec.node.build import deployment, precisions_for
from flowspec.store import load_head, load_stage
from flowspec.store.registry import resolve
from flowspec.store.shard import plan_bytes, split_model
from flowspec.store.weights import read_hf_config

FORMATS = [Precision("bfloat16"), Precision("float16"), Precision("bfloat16", "int8"),
           Precision("bfloat16", "int4", 32)]


def tiny_llama(folder: Path) -> Path:
    """Sizes the packed int4 kernel takes (multiples of its tile), a few layers, a small vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(5)
    cfg = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=10000.0, eos_token_id=1,
                      bos_token_id=0, initializer_range=0.1)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("precision") / "tiny")


def _forward(shards: Path, x: torch.Tensor) -> torch.Tensor:
    """Run the hidden states of `x` (token ids) through every stage and the head; return float32 logits."""
    h: torch.Tensor = x
    k = 1
    while (shards / f"stage-{k}").exists():
        stage = load_stage(shards / f"stage-{k}")
        cache = stage.new_cache(64)
        h = stage.forward(h, torch.arange(x.shape[0]), cache)
        k += 1
    return load_head(shards / "stage-0").forward(h)


@pytest.mark.parametrize("precision", FORMATS, ids=lambda p: p.tag)
def test_shards_are_written_converted_and_compute_close_to_float32(model_dir: Path, tmp_path: Path,
                                                                   precision: Precision) -> None:
    exact = split_model(model_dir, [2, 2], out_dir=tmp_path / "fp32")
    shards = split_model(model_dir, [2, 2], out_dir=tmp_path / precision.tag, precision=precision)
    man = json.loads((shards / "stage-1" / "manifest.json").read_text())
    assert (man["dtype"], man["quant"]) == (precision.dtype, precision.quant)
    stage = load_stage(shards / "stage-1")
    assert stage.embed_dtype == precision.torch_dtype
    assert stage.new_cache(8).k.dtype == precision.torch_dtype
    x = torch.randint(2, 128, (12,))
    want, got = _forward(exact, x), _forward(shards, x)
    err = ((got - want).norm() / want.norm()).item()
    bound = {"none": 0.02, "int8": 0.05, "int4": 0.5}[precision.quant]  # random weights, 5 layers: harsh
    assert err < bound, f"{precision.tag}: relative logit error {err:.4f}"
    out = stage.forward(torch.randint(2, 128, (3,)), torch.arange(3), stage.new_cache(8))
    assert out.dtype == precision.torch_dtype  # hidden states go on the wire in the compute dtype


@pytest.mark.parametrize("precision", [Precision(), *FORMATS], ids=lambda p: p.tag)
def test_the_plan_predicts_the_shard_bytes(model_dir: Path, tmp_path: Path, precision: Precision) -> None:
    shards = split_model(model_dir, [3, 1], out_dir=tmp_path / "s", precision=precision)
    cfg = read_hf_config(resolve(str(model_dir)))
    plan = plan_bytes(cfg, [3, 1], precision, context=100)
    for k, row in enumerate(plan):
        size = (shards / f"stage-{k}" / "weights.safetensors").stat().st_size
        assert abs(size - row["weights"]) <= 0.02 * size + 16_384, (row, size)  # + safetensors' header
    assert plan[1]["kv"] == 3 * 2 * cfg.num_kv_heads * cfg.head_dim * 100 * precision.torch_dtype.itemsize


def test_int4_weights_are_a_sixth_of_float32_or_less(model_dir: Path) -> None:
    cfg = read_hf_config(resolve(str(model_dir)))
    fp32 = plan_bytes(cfg, [4], Precision(), 0)[1]["weights"] - cfg.vocab_size * cfg.hidden_size * 4
    int4 = plan_bytes(cfg, [4], Precision("bfloat16", "int4", 64), 0)[1]["weights"] - cfg.vocab_size * cfg.hidden_size * 2
    assert int4 <= fp32 / 6, (int4, fp32)


def test_every_format_has_its_own_fingerprint_and_shards(model_dir: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    fp32 = deployment(str(model_dir), 2, cache_dir=cache)
    int8 = deployment(str(model_dir), 2, cache_dir=cache, precisions=Precision("bfloat16", "int8"))
    assert fp32.fingerprint != int8.fingerprint and "int8" in int8.fingerprint
    assert "/" in fp32.fingerprint and "float32" not in fp32.fingerprint  # fp32 keeps its old fingerprint
    assert fp32.shard(1) != int8.shard(1) and int8.shard(1).is_dir()
    mixed = deployment(str(model_dir), 2, cache_dir=cache,
                       precisions=(Precision(), Precision("bfloat16", "int4", 32), Precision()), prepare=[1])
    assert mixed.fingerprint.endswith("float32,bfloat16-int4g32,float32")


def test_peers_lines_choose_formats_and_bad_values_are_refused() -> None:
    peers = parse_peers("127.0.0.1:7000 quant=int8\n127.0.0.1:7001 device=cuda:0\n127.0.0.1:7002 dtype=bfloat16\n"
                        "127.0.0.1:7003\n")
    head, gpu, bf16, default = precisions_for(peers, quant="none")
    assert head == Precision("bfloat16", "int8") and gpu == Precision("float16")
    assert bf16 == Precision("bfloat16") and default == Precision("float32")
    assert precisions_for(peers, dtype="bfloat16")[3] == Precision("bfloat16")
    for bad, what in [("quant=int3", "quant=int3"), ("dtype=fp8", "dtype=fp8"), ("device=tpu", "device=tpu")]:
        with pytest.raises(ConfigError, match=what):
            parse_peers(f"127.0.0.1:7000\n127.0.0.1:7001 {bad}\n")
    with pytest.raises(ConfigError, match="GPU stage"):
        precisions_for(parse_peers("127.0.0.1:7000\n127.0.0.1:7001 device=cuda quant=int4\n"))


def test_precision_validation_and_tags() -> None:
    assert Precision.parse("auto") == Precision("float32")
    assert Precision.parse("auto", device=torch.device("cuda")) == Precision("float16")
    assert Precision.parse("auto", "int4") == Precision("bfloat16", "int4")
    for p in [Precision(), *FORMATS]:
        assert Precision.from_tag(p.tag) == p
    with pytest.raises(ConfigError, match="dtype"):
        Precision.parse("float64")
    with pytest.raises(ConfigError, match="group"):
        Precision("bfloat16", "int4", 48)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            resolve_device("cuda")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (this machine has none)")
def test_a_stage_computes_on_the_gpu_in_float16(model_dir: Path, tmp_path: Path) -> None:
    shards = split_model(model_dir, [4], out_dir=tmp_path / "gpu", precision=Precision("float16"))
    stage = load_stage(shards / "stage-1", device="cuda")
    cache = stage.new_cache(32)
    assert cache.k.device.type == "cuda" and stage.embed_dtype == torch.float16
    out = stage.forward(torch.randint(2, 128, (5,)), torch.arange(5), cache)
    assert out.device.type == "cuda" and out.dtype == torch.float16
    logits = load_head(shards / "stage-0", device="cuda").forward(out)
    assert logits.device.type == "cpu" and logits.dtype == torch.float32
