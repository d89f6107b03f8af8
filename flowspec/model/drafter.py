"""Drafters: a whole small model with its own KV cache that proposes tree nodes for D0.

The cache holds the synced context (committed tokens) followed by scratch nodes (the draft tree being grown).
A scratch node sees the context, its scratch ancestors and itself, so one call can expand a whole tree level.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence

import torch

from flowspec.errors import ConfigError, ModelError, ModelMismatch
from flowspec.model.config import ModelConfig
from flowspec.model.load import load_full, load_tokenizer
from flowspec.model.registry import resolve
from flowspec.model.stage import LMHead, StageModel
from flowspec.model.weights import read_hf_config

PathLike = str | os.PathLike[str]


class Drafter:
    def __init__(self, model: StageModel, head: LMHead, capacity: int = 1024, name: str = "") -> None:
        if model.embed is None or model.norm is None:
            raise ModelError("a drafter needs a whole model (embedding and final norm)")
        self.model, self.head, self.name = model, head, name
        self.cache = model.new_cache(capacity)
        self.context: list[int] = []  # the synced context; K/V of its first `computed` tokens are cached
        self.computed = 0  # cache = [context[:computed] | scratch nodes]
        self._anc = torch.zeros(0, 0, dtype=torch.bool)  # [S, S] scratch ancestor-or-self matrix

    @property
    def num_scratch(self) -> int:
        return self._anc.shape[0]

    def sync(self, committed: Sequence[int]) -> None:
        """Make the context equal `committed`: keep the common prefix; what is new is forwarded lazily, in the
        same forward as the next `expand` (one pass instead of two: drafting is on the head's critical path)."""
        committed = [int(t) for t in committed]
        common = 0
        for a, b in zip(self.context[: self.computed], committed):
            if a != b:
                break
            common += 1
        self.computed = common
        self.context = committed
        self.reset_scratch()

    @property
    def pending(self) -> int:
        """Context tokens not yet in the cache (forwarded with the next expand)."""
        return len(self.context) - self.computed

    def flush(self) -> None:
        """Forward the pending context now (expand does this itself)."""
        if self.pending:
            self.reset_scratch()
            self._forward_rows([], [], [])

    def reset_scratch(self) -> None:
        """Drop every scratch node: the cache is back to the computed part of the context."""
        self.cache.truncate(self.computed)
        self._anc = torch.zeros(0, 0, dtype=torch.bool)

    def expand(self, tokens: list[int], parents: list[int], positions: list[int]) -> torch.Tensor:
        """Forward n scratch nodes; return log-probs [n, V] (float32) of each node's next token.

        parents[i]: -1 (child of the context) or an index into all scratch nodes fed since reset_scratch(),
        including earlier nodes of this call.
        """
        n = len(tokens)
        if not n == len(parents) == len(positions):
            raise ModelError(f"expand: {n} tokens, {len(parents)} parents, {len(positions)} positions")
        hidden = self._forward_rows(tokens, parents, positions)
        return torch.log_softmax(self.head(hidden), dim=-1)

    def _forward_rows(self, tokens: list[int], parents: list[int], positions: list[int]) -> torch.Tensor:
        """One forward: the pending context rows (causal), then n scratch rows; returns the scratch hidden."""
        s0, n = self.num_scratch, len(tokens)
        pending = self.context[self.computed:]
        if pending and s0:
            raise ModelError("drafter: context changed under scratch nodes; call sync() first")
        done, m = self.computed, len(pending)
        ctx = done + m
        anc = torch.zeros(s0 + n, s0 + n, dtype=torch.bool)
        anc[:s0, :s0] = self._anc
        for i, p in enumerate(parents):
            if not -1 <= p < s0 + i:
                raise ModelError(f"expand: parent {p} of scratch node {s0 + i} must be -1 or an earlier node")
            if p >= 0:
                anc[s0 + i] = anc[p]
            anc[s0 + i, s0 + i] = True
        visible = torch.zeros(m + n, ctx + s0 + n, dtype=torch.bool)  # [rows, cache after this forward]
        visible[:, :done] = True
        visible[:m, done:ctx] = torch.ones(m, m, dtype=torch.bool).tril_()  # pending context: causal
        visible[m:, done:ctx] = True  # scratch rows see the whole context
        visible[m:, ctx:] = anc[s0:]
        self._room(m + n)
        rows = torch.tensor(pending + list(tokens), dtype=torch.long)
        pos = torch.tensor(list(range(done, ctx)) + list(positions), dtype=torch.long)
        hidden = self.model(rows, pos, self.cache, visible)
        self.computed, self._anc = ctx, anc
        return hidden[m:]

    def _room(self, n: int) -> None:
        # drafters grow their cache instead of failing: their context is D0's, not a stage's fixed budget
        need = self.cache.length + n
        if need > self.cache.capacity:
            self.cache.grow(max(need, 2 * self.cache.capacity))


def tokenizer_signature(ref: PathLike, cache_dir: PathLike | None = None) -> tuple[int, str]:
    """(vocab size, sha256 of the sorted token->id map): two models can share drafts only if these match."""
    tok = load_tokenizer(ref, cache_dir)
    vocab = tok.get_vocab()
    blob = json.dumps(sorted(vocab.items(), key=lambda kv: kv[1]), ensure_ascii=False).encode()
    return len(vocab), hashlib.sha256(blob).hexdigest()


def check_same_tokenizer(draft: PathLike, target: PathLike, cache_dir: PathLike | None = None) -> None:
    d_cfg, t_cfg = read_hf_config(resolve(draft, cache_dir)), read_hf_config(resolve(target, cache_dir))
    if d_cfg.vocab_size != t_cfg.vocab_size:
        raise ModelMismatch(f"draft {draft} has vocab size {d_cfg.vocab_size}, target {target} has "
                            f"{t_cfg.vocab_size}: a draft must use the target's tokenizer")
    d_sig, t_sig = tokenizer_signature(draft, cache_dir), tokenizer_signature(target, cache_dir)
    if d_sig != t_sig:
        raise ModelMismatch(f"draft {draft} and target {target} have different tokenizers "
                            f"({d_sig[0]} tokens {d_sig[1][:8]} vs {t_sig[0]} tokens {t_sig[1][:8]}): "
                            "pick a draft from the target's model family")


def random_drafter_model(vocab_size: int, seed: int) -> tuple[StageModel, LMHead]:
    """A tiny random llama over the target's vocabulary: a draft that is almost always wrong (tests)."""
    cfg = ModelConfig(arch="llama", vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_layers=2,
                      num_heads=4, num_kv_heads=2, tie_word_embeddings=True)
    gen = torch.Generator().manual_seed(seed)
    model, head = StageModel(cfg, 0, 2, True, True), LMHead(cfg)
    with torch.no_grad():
        for p in [*model.parameters(), *head.parameters()]:
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model.eval().requires_grad_(False), head.eval().requires_grad_(False)


def make_drafter(spec: str, target_ref: PathLike, cache_dir: PathLike | None = None, seed: int = 0,
                 capacity: int = 1024) -> Drafter:
    """`self`, `self:layers=N`, `random`, or a model name/path sharing the target's tokenizer."""
    if spec == "self":
        return Drafter(*load_full(target_ref, cache_dir), capacity=capacity, name="self")
    m = re.fullmatch(r"self:layers=(\d+)", spec)
    if m:
        return Drafter(*load_full(target_ref, cache_dir, int(m.group(1))), capacity=capacity, name=spec)
    if spec == "random":
        vocab = read_hf_config(resolve(target_ref, cache_dir)).vocab_size
        return Drafter(*random_drafter_model(vocab, seed), capacity=capacity, name="random")
    if spec.startswith("self:"):
        raise ConfigError(f"draft {spec!r}: use self, self:layers=N, random, or a model name/path")
    check_same_tokenizer(spec, target_ref, cache_dir)
    return Drafter(*load_full(spec, cache_dir), capacity=capacity, name=spec)
