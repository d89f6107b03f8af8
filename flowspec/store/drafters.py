"""Drafters by name: `self`, `self:layers=N`, `random`, or another model that shares the target's tokenizer."""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from typing import Literal, final

import torch

from flowspec.errors import ConfigError, ModelMismatch
from flowspec.model.drafter import Drafter, random_drafter_model
from flowspec.model.precision import Precision
from flowspec.store.load import load_full, load_tokenizer
from flowspec.store.registry import resolve
from flowspec.store.weights import read_hf_config

__all__ = ["DraftSpec", "check_same_tokenizer", "make_drafter", "tokenizer_signature"]

PathLike = str | os.PathLike[str]


@final
@dataclass(frozen=True, slots=True)
class DraftSpec:
    """A draft as named on the command line: the target itself (`self`), its first N layers
    (`self:layers=N`), a tiny random model (`random`), or another model's name or path. `str()` gives the name
    back."""

    kind: Literal["self", "random", "model"]
    layers: int | None = None  # self: the target's first `layers` layers (None: all of them)
    model: str = ""  # model: a name or a path

    @classmethod
    def parse(cls, text: str) -> DraftSpec:
        if text == "self":
            return cls("self")
        if text == "random":
            return cls("random")
        if m := re.fullmatch(r"self:layers=(\d+)", text):
            return cls("self", layers=int(m.group(1)))
        if text.startswith("self:") or not text:
            raise ConfigError(f"draft {text!r}: use self, self:layers=N, random, or a model name/path")
        return cls("model", model=text)

    def __str__(self) -> str:
        if self.kind == "self":
            return "self" if self.layers is None else f"self:layers={self.layers}"
        return self.model if self.kind == "model" else "random"


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


def make_drafter(spec: str | DraftSpec, target_ref: PathLike, cache_dir: PathLike | None = None, seed: int = 0,
                 capacity: int = 1024, precision: Precision = Precision(),
                 device: torch.device | str = "cpu") -> Drafter:
    """`self`, `self:layers=N`, `random`, or a model name/path sharing the target's tokenizer (`DraftSpec`), in
    `precision` on `device` (the head's: the drafter and the lm_head share D0)."""
    draft = spec if isinstance(spec, DraftSpec) else DraftSpec.parse(spec)
    if draft.kind == "random":
        vocab = read_hf_config(resolve(target_ref, cache_dir)).vocab_size
        model, head = random_drafter_model(vocab, seed)  # tiny: fp32 on the CPU whatever the target's format
        return Drafter(model, head, capacity=capacity, name="random")
    if draft.kind == "model":
        check_same_tokenizer(draft.model, target_ref, cache_dir)
    ref = target_ref if draft.kind == "self" else draft.model
    return Drafter(*load_full(ref, cache_dir, draft.layers, precision, device), capacity=capacity, name=str(draft))
