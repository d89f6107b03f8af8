"""Our StageModel chain reproduces transformers' unsplit model: logits within fp32 tolerance, same argmax."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flowspec.store.load import load_full, load_head, load_hf_reference, load_stage, load_tokenizer
from flowspec.store.shard import split_model


def run_chain(shards: Path, tokens: torch.Tensor, chunks: list[int]) -> torch.Tensor:
    """Feed `tokens` through stage-1..N then the head, in prefill chunks, as the ring does."""
    stages, k = [], 1
    while (shards / f"stage-{k}").is_dir():
        stages.append(load_stage(shards / f"stage-{k}", expect_stage=k))
        k += 1
    head = load_head(shards / "stage-0")
    caches = [s.new_cache(64) for s in stages]
    out, start = [], 0
    for n in chunks:
        x: torch.Tensor = tokens[start : start + n]
        pos = torch.arange(start, start + n)
        for stage, cache in zip(stages, caches):
            x = stage(x, pos, cache)
        out.append(head(x))
        start += n
    return torch.cat(out)


def reference_logits(folder: Path, tokens: torch.Tensor) -> torch.Tensor:
    ref = load_hf_reference(folder)
    with torch.no_grad():
        return ref(tokens[None]).logits[0].float()


def assert_close(ours: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    assert ours.shape == ref.shape
    err = (ours - ref).abs().max().item()
    assert err < tol, f"max |diff| {err} >= {tol}"
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize("num_stages", [1, 2, 3, 5])
def test_tiny_chain_matches_transformers(tiny_model: Path, tmp_path: Path, num_stages: int) -> None:
    tokens = torch.randint(0, 97, (23,), generator=torch.Generator().manual_seed(num_stages))
    shards = split_model(tiny_model, None, num_stages, out_dir=tmp_path / "s")
    ours = run_chain(shards, tokens, [7, 1, 10, 5])
    assert_close(ours, reference_logits(tiny_model, tokens), 1e-4)


def test_full_model_matches_transformers(tiny_model: Path) -> None:
    tokens = torch.arange(3, 40)
    model, head = load_full(tiny_model)
    cache = model.new_cache(64)
    ours = head(model(tokens, torch.arange(len(tokens)), cache))
    assert cache.length == len(tokens)
    assert_close(ours, reference_logits(tiny_model, tokens), 1e-4)


PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
]


@pytest.mark.slow
@pytest.mark.parametrize("num_stages", [1, 2, 3, 4, 5])
def test_smollm2_chain_matches_transformers(smollm2: Path, tmp_path: Path, num_stages: int, smollm2_ref) -> None:
    tok = load_tokenizer(smollm2)
    shards = split_model(smollm2, None, num_stages, out_dir=tmp_path / "s")
    for prompt in PROMPTS:
        tokens = torch.tensor(tok(prompt)["input_ids"])
        n = len(tokens)
        ours = run_chain(shards, tokens, [n - 3, 1, 2])
        assert_close(ours, smollm2_ref(tokens), 2e-3)


@pytest.mark.slow
@pytest.mark.qwen
def test_qwen05_matches_transformers() -> None:
    """The realistic draft (qwen2 arch, q/k/v biases, untied head) through our code vs transformers."""
    from flowspec.store.registry import RECEIPT, model_dir

    if not (model_dir("qwen2.5-coder-0.5b") / RECEIPT).is_file():
        pytest.skip("qwen2.5-coder-0.5b not pulled (flowspec models pull qwen2.5-coder-0.5b)")
    tokens = torch.tensor(load_tokenizer("qwen2.5-coder-0.5b")(PROMPTS[1])["input_ids"])
    model, head = load_full("qwen2.5-coder-0.5b")
    cache = model.new_cache(64)
    n = len(tokens)
    ours = torch.cat([head(model(tokens[:a], torch.arange(0, a), cache)) if a == n - 2 else
                      head(model(tokens[n - 2 :], torch.arange(n - 2, n), cache)) for a in (n - 2, n)])
    del model, head
    assert_close(ours, reference_logits(model_dir("qwen2.5-coder-0.5b"), tokens), 5e-3)
