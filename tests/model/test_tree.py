"""Tree-masked forwards equal per-path sequential forwards; compaction equals recomputing from scratch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowspec.errors import ModelError
from flowspec.model.kv_cache import KVCache
from flowspec.model.stage import LMHead, StageModel
from flowspec.store.load import load_full
from flowspec.treemask import causal_visible, tree_visible

SETTINGS = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def models(tiny_llama: Path, tiny_qwen2: Path) -> dict[str, tuple[StageModel, LMHead]]:
    return {"llama": load_full(tiny_llama), "qwen2": load_full(tiny_qwen2)}


@st.composite
def trees(draw: st.DrawFn) -> tuple[list[int], list[int], list[int], str]:
    n = draw(st.integers(1, 10))
    parents = [draw(st.integers(-1, i - 1)) for i in range(n)]
    tokens = draw(st.lists(st.integers(0, 96), min_size=n, max_size=n))
    context = draw(st.lists(st.integers(0, 96), min_size=1, max_size=12))
    return context, parents, tokens, draw(st.sampled_from(["llama", "qwen2"]))


def path_to(node: int, parents: list[int]) -> list[int]:
    path = []
    while node >= 0:
        path.append(node)
        node = parents[node]
    return path[::-1]


def sequential_logits(model: StageModel, head: LMHead, tokens: list[int]) -> torch.Tensor:
    cache = model.new_cache(64)
    return head(model(torch.tensor(tokens), torch.arange(len(tokens)), cache))[-1]


def depths(parents: list[int]) -> list[int]:
    d: list[int] = []
    for p in parents:
        d.append(0 if p < 0 else d[p] + 1)
    return d


@SETTINGS
@given(trees())
def test_tree_forward_equals_paths(models, case) -> None:  # type: ignore[no-untyped-def]
    context, parents, tokens, arch = case
    model, head = models[arch]
    c = len(context)
    cache = model.new_cache(64)
    model(torch.tensor(context), torch.arange(c), cache)
    pos = torch.tensor([c + d for d in depths(parents)])
    logits = head(model(torch.tensor(tokens), pos, cache, tree_visible(c, parents)))
    for i in range(len(tokens)):
        want = sequential_logits(model, head, context + [tokens[j] for j in path_to(i, parents)])
        torch.testing.assert_close(logits[i], want, atol=2e-5, rtol=1e-4)


@SETTINGS
@given(trees(), st.data())
def test_compact_then_forward_equals_recompute(models, case, data) -> None:  # type: ignore[no-untyped-def]
    context, parents, tokens, arch = case
    model, head = models[arch]
    c, n = len(context), len(tokens)
    cache = model.new_cache(64)
    model(torch.tensor(context), torch.arange(c), cache)
    model(torch.tensor(tokens), torch.tensor([c + d for d in depths(parents)]), cache, tree_visible(c, parents))
    # commit the path to a random node; keep some other nodes after it (in a random order), as a verdict does
    path = path_to(data.draw(st.integers(0, n - 1)), parents)
    others = data.draw(st.permutations([i for i in range(n) if i not in path]))
    extra = others[: data.draw(st.integers(0, len(others)))]
    cache.compact(c, [c + i for i in path + extra])
    assert cache.length == c + len(path) + len(extra)
    nxt = data.draw(st.integers(0, 96))
    ctx_len = c + len(path)
    visible = torch.zeros(1, cache.length + 1, dtype=torch.bool)
    visible[0, :ctx_len] = True  # the committed context, not the kept extras
    visible[0, -1] = True
    got = head(model(torch.tensor([nxt]), torch.tensor([ctx_len]), cache, visible))[0]
    want = sequential_logits(model, head, context + [tokens[i] for i in path] + [nxt])
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_causal_visible_shape_and_content() -> None:
    v = causal_visible(3, 2)
    assert v.tolist() == [[True, True, True, True, False], [True, True, True, True, True]]
    assert torch.equal(tree_visible(3, [-1, 0]), v)


def test_cache_overflow_and_bad_compact_are_clear() -> None:
    cache = KVCache(2, 1, 4, capacity=4)
    cache.length = 3
    with pytest.raises(ModelError, match="KV cache full"):
        cache.check_room(2)
    with pytest.raises(ModelError, match=r"slots must lie in \[1, 3\)"):
        cache.compact(1, [0, 2])
    with pytest.raises(ModelError, match="truncate"):
        cache.truncate(4)
    cache.compact(1, [2])
    assert cache.length == 2


def test_stage_refuses_wrong_inputs(models) -> None:  # type: ignore[no-untyped-def]
    model, _ = models["llama"]
    cache = model.new_cache(4)
    with pytest.raises(ModelError, match="visible must be bool"):
        model(torch.tensor([1, 2]), torch.arange(2), cache, torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ModelError, match="KV cache full"):
        model(torch.arange(5), torch.arange(5), cache)
    assert cache.length == 0
