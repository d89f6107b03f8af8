"""Fixtures: tiny random-weight llama/qwen2 folders (instant) and SmolLM2 pulled into the default cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flowspec.store.pull import pull
from flowspec.store.registry import RECEIPT, model_dir


def make_tiny(folder: Path, arch: str, seed: int = 0, vocab: int = 97, layers: int = 5, tie: bool = False) -> Path:
    """Save a random-weight HF model; scaled-up init so logits are far from uniform (argmax is meaningful)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=112, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  tie_word_embeddings=tie, rms_norm_eps=1e-5, eos_token_id=1, bos_token_id=0)
    torch.manual_seed(seed)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, rope_theta=10000.0))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common, rope_theta=1000000.0))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1 and "norm" not in str(p):
                p.add_(torch.randn_like(p) * 0.1)  # give qwen2's q/k/v biases non-zero values
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("tiny") / "tiny-llama", "llama", seed=1, tie=True)


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("tiny") / "tiny-qwen2", "qwen2", seed=2)


@pytest.fixture(scope="session", params=["llama", "qwen2"])
def tiny_model(request: pytest.FixtureRequest, tiny_llama: Path, tiny_qwen2: Path) -> Path:
    return tiny_llama if request.param == "llama" else tiny_qwen2


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """SmolLM2-135M in the default cache, pulled (about 25 s) the first time."""
    if not (model_dir("smollm2-135m") / RECEIPT).is_file():
        pull("smollm2-135m")
    return model_dir("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_ref(smollm2: Path):  # type: ignore[no-untyped-def]
    """transformers' SmolLM2 forward, loaded once: tokens [n] -> logits [n, V]."""
    from flowspec.store.load import load_hf_reference

    model = load_hf_reference(smollm2)

    def logits(tokens: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(tokens[None]).logits[0].float()

    return logits


@pytest.fixture(scope="session")
def tiny_factory():  # type: ignore[no-untyped-def]
    """make_tiny itself, for tests that need extra models (test files are not a package)."""
    return make_tiny
