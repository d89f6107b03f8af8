"""Drafters by name: `self`, `self:layers=N`, `random`, or another model that shares the target's tokenizer."""

from __future__ import annotations

import hashlib
import json
import os
import re

import torch

from flowspec.errors import ConfigError, ModelMismatch
from flowspec.model.drafter import Drafter, random_drafter_model
from flowspec.model.precision import Precision
from flowspec.store.load import load_full, load_tokenizer
from flowspec.store.registry import resolve
from flowspec.store.weights import read_hf_config

__all__ = ["check_same_tokenizer", "make_drafter", "tokenizer_signature"]

PathLike = str | os.PathLike[str]


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


def make_drafter(spec: str, target_ref: PathLike, cache_dir: PathLike | None = None, seed: int = 0,
                 capacity: int = 1024, precision: Precision = Precision(),
                 device: torch.device | str = "cpu") -> Drafter:
    """`self`, `self:layers=N`, `random`, or a model name/path sharing the target's tokenizer, in `precision`
    on `device` (the head's: the drafter and the lm_head share D0)."""
    if spec == "self":
        return Drafter(*load_full(target_ref, cache_dir, None, precision, device), capacity=capacity, name="self")
    m = re.fullmatch(r"self:layers=(\d+)", spec)
    if m:
        parts = load_full(target_ref, cache_dir, int(m.group(1)), precision, device)
        return Drafter(*parts, capacity=capacity, name=spec)
    if spec == "random":
        vocab = read_hf_config(resolve(target_ref, cache_dir)).vocab_size
        model, head = random_drafter_model(vocab, seed)  # tiny: fp32 on the CPU whatever the target's format
        return Drafter(model, head, capacity=capacity, name="random")
    if spec.startswith("self:"):
        raise ConfigError(f"draft {spec!r}: use self, self:layers=N, random, or a model name/path")
    check_same_tokenizer(spec, target_ref, cache_dir)
    return Drafter(*load_full(spec, cache_dir, None, precision, device), capacity=capacity, name=spec)
