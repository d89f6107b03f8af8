"""`flowspec models add` on the Qwen2.5-Coder-0.5B GGUF given as a file path (assembled here from its installed
weight packages) gives the pulled model, and the added model runs in every mode over 2 real stage processes:
ar, chunk, pipedec and flowspec give the same tokens, which are the pulled model's greedy tokens."""

from __future__ import annotations

import gc
import shutil
from pathlib import Path

import pytest
import torch

from flowspec.api import Cluster, Request
from flowspec.cli import main
from flowspec.errors import ModelNotInstalled
from flowspec.store import load_full, resolve
from flowspec.store.pull import assemble, locate_parts
from flowspec.store.registry import get_spec, model_fingerprint
from tests.e2e.conftest import require_model

PULLED, ADDED = "qwen2.5-coder-0.5b", "qwen05-added"
NEW = 8
PROMPT = "Write a Python function that reverses a string."


def pulled_greedy(ids: list[int], n: int) -> list[int]:
    """`ar` on the pulled model, unsplit, in this process: prefill, then one token at a time through the KV cache."""
    model, head = load_full(PULLED)
    kv = model.new_cache(len(ids) + n)
    logits = head.forward(model.forward(torch.tensor(ids), torch.arange(len(ids)), kv))[-1]
    out: list[int] = []
    for pos in range(len(ids), len(ids) + n):
        out.append(int(logits.argmax()))
        if len(out) < n:
            logits = head.forward(model.forward(torch.tensor(out[-1:]), torch.tensor([pos]), kv))[-1]
    del model, head
    gc.collect()
    return out


@pytest.mark.slow
@pytest.mark.qwen
async def test_the_qwen_gguf_added_by_path_is_the_pulled_model_in_every_mode(tmp_path: Path) -> None:
    require_model(PULLED)  # skips unless it is pulled (or FLOWSPEC_PULL_QWEN=1)
    spec = get_spec(PULLED)
    try:
        parts = locate_parts(spec, install=None)
    except ModelNotInstalled as e:
        pytest.skip(f"the {PULLED} weight packages are not installed: {e}")
    gguf, cache = tmp_path / "qwen05.gguf", tmp_path / "cache"
    try:
        assemble(parts, gguf, spec.size, spec.sha256)  # 491,400,064 bytes, sha256 checked
        assert main(["models", "add", str(gguf), "--name", ADDED, "--cache-dir", str(cache)]) == 0
        gguf.unlink()
        added, pulled = resolve(ADDED, cache), resolve(PULLED)
        # same config and weights bit for bit, and the same tokenizer
        assert model_fingerprint(added) == model_fingerprint(pulled), "the GGUF added by path is not the pulled model"
        assert (added / "tokenizer.json").read_bytes() == (pulled / "tokenizer.json").read_bytes()

        tokens: dict[str, list[int]] = {}
        async with await Cluster.start_local(ADDED, 2, draft="self:layers=20", cache_dir=str(cache),
                                             device="cpu") as cluster:
            ids = cluster.encode(PROMPT)
            for mode in ("ar", "chunk", "pipedec", "flowspec"):
                tokens[mode] = (await cluster.generate(ids, Request(mode, NEW))).tokens
        assert len(tokens["ar"]) == NEW, tokens
        assert all(t == tokens["ar"] for t in tokens.values()), tokens
        assert tokens["ar"] == pulled_greedy(ids, NEW), "the added model's tokens differ from the pulled model's"
    finally:
        gguf.unlink(missing_ok=True)
        shutil.rmtree(cache, ignore_errors=True)  # the added model and its shards: ~4 GB
