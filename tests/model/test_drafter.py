"""Drafters: `self` reproduces the target, tree expansion matches paths, sync handles divergence, tokenizers checked."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from flowspec.errors import ConfigError, ModelError, ModelMismatch
from flowspec.store import DraftSpec, make_drafter
from flowspec.store.load import load_full


def save_tokenizer(folder: Path, words: list[str]) -> None:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[2]))
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token=words[2]).save_pretrained(folder)


def target_logprobs(folder: Path, tokens: list[int], layers: int | None = None) -> torch.Tensor:
    model, head = load_full(folder, num_layers=layers)
    return torch.log_softmax(head(model(torch.tensor(tokens), torch.arange(len(tokens)), model.new_cache(64))), -1)


@pytest.mark.parametrize("spec,layers", [("self", None), ("self:layers=3", 3)])
def test_self_drafter_reproduces_target(tiny_model: Path, spec: str, layers: int | None) -> None:
    prompt = [5, 9, 2, 44, 17, 3]
    d = make_drafter(spec, tiny_model).new_state()
    d.sync(prompt[:-1])
    got = d.expand([prompt[-1]], [-1], [len(prompt) - 1])
    want = target_logprobs(tiny_model, prompt, layers)[-1]
    torch.testing.assert_close(got[0], want, atol=2e-5, rtol=1e-4)
    assert got.dtype == torch.float32


def test_expand_levels_match_paths_and_reset(tiny_llama: Path) -> None:
    ctx = [4, 8, 15, 16]
    d = make_drafter("self", tiny_llama, capacity=5).new_state()  # small: forces the cache to grow
    d.sync(ctx)
    lvl1 = d.expand([23, 42], [-1, -1], [4, 4])
    lvl2 = d.expand([7, 8, 9], [0, 1, 2], [5, 5, 6])  # node 4 is a child of node 2 from this same call
    assert d.num_scratch == 5
    for row, path in [(lvl1[0], [23]), (lvl1[1], [42]), (lvl2[0], [23, 7]), (lvl2[1], [42, 8]), (lvl2[2], [23, 7, 9])]:
        torch.testing.assert_close(row, target_logprobs(tiny_llama, ctx + path)[-1], atol=2e-5, rtol=1e-4)
    d.reset_scratch()
    assert d.cache.length == len(ctx)


def test_sync_divergence_recomputes(tiny_llama: Path) -> None:
    d = make_drafter("self", tiny_llama).new_state()
    d.sync([1, 2, 3, 4, 5, 6])
    d.expand([9], [-1], [6])
    d.sync([1, 2, 3, 7, 8])  # diverges at index 3: truncate to 3; [7, 8] go with the next expand
    assert d.cache.length == 3 and d.pending == 2 and d.num_scratch == 0
    got = d.expand([9], [-1], [5])[0]
    assert d.computed == 5 and d.pending == 0 and d.cache.length == 6
    torch.testing.assert_close(got, target_logprobs(tiny_llama, [1, 2, 3, 7, 8, 9])[-1], atol=2e-5, rtol=1e-4)


def test_states_over_one_drafter_are_independent(tiny_llama: Path) -> None:
    """Two requests draft at once over shared weights: interleaved syncs and levels do not disturb each other."""
    drafter = make_drafter("self", tiny_llama)
    a, b = drafter.new_state(), drafter.new_state()
    a.sync([1, 2, 3])
    lvl_a = a.expand([4, 5], [-1, -1], [3, 3])
    b.sync([9, 8, 7, 6])  # another request's context and tree in between
    b.expand([5], [-1], [4])
    lvl_a2 = a.expand([6], [1], [4])  # parent 1 is a's own scratch node, whatever b holds
    lvl_b = b.expand([4], [0], [5])
    assert a.num_scratch == 3 and b.num_scratch == 2
    for row, path in [(lvl_a[0], [1, 2, 3, 4]), (lvl_a[1], [1, 2, 3, 5]), (lvl_a2[0], [1, 2, 3, 5, 6])]:
        torch.testing.assert_close(row, target_logprobs(tiny_llama, path)[-1], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(lvl_b[0], target_logprobs(tiny_llama, [9, 8, 7, 6, 5, 4])[-1], atol=2e-5, rtol=1e-4)


def test_bad_parent_is_refused_and_leaves_the_scratch_alone(tiny_llama: Path) -> None:
    d = make_drafter("self", tiny_llama).new_state()
    d.sync([1, 2, 3])
    d.expand([4], [-1], [3])
    with pytest.raises(ModelError, match="expand: parent 2 of tree slot 2 must be -1 or an earlier slot"):
        d.expand([5, 6], [0, 2], [4, 5])
    assert d.num_scratch == 1 and d.cache.length == 4
    got = d.expand([5], [0], [4])[0]
    torch.testing.assert_close(got, target_logprobs(tiny_llama, [1, 2, 3, 4, 5])[-1], atol=2e-5, rtol=1e-4)


def test_random_drafter_is_seeded_and_uses_target_vocab(tiny_qwen2: Path) -> None:
    a, b = make_drafter("random", tiny_qwen2, seed=3).new_state(), make_drafter("random", tiny_qwen2, seed=3).new_state()
    for d in (a, b):
        d.sync([1, 2, 3])
    la, lb = a.expand([4], [-1], [3]), b.expand([4], [-1], [3])
    assert la.shape == (1, 97) and torch.equal(la, lb)


def test_bad_spec_refused(tiny_llama: Path) -> None:
    with pytest.raises(ConfigError, match="self:layers=N"):
        make_drafter("self:layerz=3", tiny_llama)


@pytest.fixture()
def with_tokenizers(tmp_path: Path, tiny_llama: Path, tiny_factory) -> dict[str, Path]:  # type: ignore[no-untyped-def]
    make_tiny = tiny_factory
    words = [f"w{i}" for i in range(97)]
    target = tmp_path / "target"
    shutil.copytree(tiny_llama, target)
    save_tokenizer(target, words)
    same = make_tiny(tmp_path / "same", "llama", seed=5, layers=2)
    save_tokenizer(same, words)
    other = make_tiny(tmp_path / "other", "llama", seed=6, layers=2)
    save_tokenizer(other, [f"x{i}" for i in range(97)])
    small = make_tiny(tmp_path / "small", "llama", seed=7, layers=2, vocab=50)
    save_tokenizer(small, words[:50])
    return {"target": target, "same": same, "other": other, "small": small}


def test_tokenizer_mismatch_refused(with_tokenizers: dict[str, Path]) -> None:
    target = with_tokenizers["target"]
    assert make_drafter(str(with_tokenizers["same"]), target).model.num_layers == 2
    with pytest.raises(ModelMismatch, match="different tokenizers"):
        make_drafter(str(with_tokenizers["other"]), target)
    with pytest.raises(ModelMismatch, match="vocab size 50"):
        make_drafter(str(with_tokenizers["small"]), target)


@pytest.mark.slow
def test_smollm2_self_drafter_matches_transformers(smollm2: Path, smollm2_ref) -> None:  # type: ignore[no-untyped-def]
    from flowspec.store.load import load_tokenizer

    prompt = load_tokenizer(smollm2)("Write a haiku about pipelines.")["input_ids"]
    d = make_drafter("self", "smollm2-135m").new_state()
    d.sync(prompt[:-1])
    got = d.expand(prompt[-1:], [-1], [len(prompt) - 1])[0]
    want = torch.log_softmax(smollm2_ref(torch.tensor(prompt))[-1], -1)
    assert (got - want).abs().max().item() < 2e-3 and got.argmax() == want.argmax()


def test_lazy_sync_fuses_the_context_pass_into_the_next_expand(tiny_llama: Path) -> None:
    """Syncing new committed tokens costs no forward of its own; the next level carries them."""
    d = make_drafter("self", tiny_llama).new_state()
    d.sync([4, 8, 15])
    d.expand([16], [-1], [3])
    calls = []
    real_forward = d.model.forward
    d.model.forward = lambda *a, **k: calls.append(a[0].numel()) or real_forward(*a, **k)  # type: ignore[method-assign]
    d.sync([4, 8, 15, 16, 23])  # two tokens committed since: 16 was drafted already and stays as it is
    assert calls == [] and d.pending == 1
    lvl = d.expand([42, 7], [-1, -1], [5, 5])
    assert calls == [3]  # 1 pending context row (23) + 2 scratch rows in one forward
    for row, path in [(lvl[0], [42]), (lvl[1], [7])]:
        torch.testing.assert_close(row, target_logprobs(tiny_llama, [4, 8, 15, 16, 23] + path)[-1],
                                   atol=2e-5, rtol=1e-4)


def test_known_nodes_cost_no_forward_across_jobs_and_verdicts(tiny_llama: Path) -> None:
    """A job that feeds the tree path again, or asks for a node drafted before, forwards nothing for it; after a
    verdict the accepted drafts stay scratch nodes, and what is drafted below them is what the target says."""
    d = make_drafter("self", tiny_llama).new_state()
    d.sync([4, 8, 15])
    d.begin_job()
    first = d.expand([16, 23], [-1, 0], [3, 4])
    d.expand([42], [1], [5])
    d.begin_job()  # a later job under the same context feeds the path 16 -> 23 -> 42 again
    assert d.rows_to_forward([16, 23, 42, 7], [-1, 0, 1, 2]) == 1
    again = d.expand([16, 23, 42, 7], [-1, 0, 1, 2], [3, 4, 5, 6])
    assert d.num_scratch == 4
    for row in range(2):  # known rows keep their best next tokens
        assert torch.equal(again[row].topk(4).indices, first[row].topk(4).indices)
    torch.testing.assert_close(again[3], target_logprobs(tiny_llama, [4, 8, 15, 16, 23, 42, 7])[-1],
                               atol=2e-5, rtol=1e-4)
    d.sync([4, 8, 15, 16, 23, 42])  # a verdict accepted 16, 23, 42: nothing to forward, scratch kept
    assert d.pending == 0 and d.num_scratch == 4 and d.computed == 3
    d.begin_job()
    below = d.expand([7, 9], [-1, -1], [6, 6])
    assert d.num_scratch == 5  # 7 was known; only 9 was forwarded
    torch.testing.assert_close(below[1], target_logprobs(tiny_llama, [4, 8, 15, 16, 23, 42, 9])[-1],
                               atol=2e-5, rtol=1e-4)
    d.sync([4, 8, 15, 99])  # a verdict that leaves the drafted path: start over from the common context
    assert d.num_scratch == 0 and d.computed == 3 and d.pending == 1


@pytest.mark.parametrize(("text", "kind", "layers", "model"), [
    ("self", "self", None, ""), ("self:layers=3", "self", 3, ""), ("random", "random", None, ""),
    ("smollm2-135m", "model", None, "smollm2-135m"), ("/models/my draft", "model", None, "/models/my draft"),
])
def test_draft_spec_round_trips(text: str, kind: str, layers: int | None, model: str) -> None:
    spec = DraftSpec.parse(text)
    assert (spec.kind, spec.layers, spec.model) == (kind, layers, model)
    assert str(spec) == text and DraftSpec.parse(str(spec)) == spec


@pytest.mark.parametrize("text", ["self:layerz=3", "self:", "self:layers=", "self:layers=-1", ""])
def test_draft_spec_refuses_what_is_no_draft(text: str) -> None:
    with pytest.raises(ConfigError, match=r"use self, self:layers=N, random, or a model name/path"):
        DraftSpec.parse(text)


def test_the_bench_assistant_and_the_drafter_read_a_spec_alike(tiny_llama: Path) -> None:
    """hf-assisted's assistant (transformers) and flowspec's drafter are the same model for the same spec."""
    from flowspec.bench.command import _hf_assistant

    for text, layers in (("self", 5), ("self:layers=2", 2)):
        spec = DraftSpec.parse(text)
        assistant = _hf_assistant(spec, str(tiny_llama), None)
        drafter = make_drafter(spec, tiny_llama)
        assert len(assistant.model.layers) == assistant.config.num_hidden_layers == layers
        assert len(drafter.model.layers) == layers and drafter.name == text
