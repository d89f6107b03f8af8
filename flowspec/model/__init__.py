"""Model loading, splitting into stage shards, the stage/head forward with KV cache and tree masks, drafters.

`flowspec.model.pull.pull(name)` installs a model. Knows nothing about sockets or peers (see docs/ARCHITECTURE.md, "model/ API").
"""

from flowspec.model.config import ModelConfig
from flowspec.model.drafter import Drafter, make_drafter
from flowspec.model.kv_cache import KVCache
from flowspec.model.load import load_full, load_head, load_hf_reference, load_stage, load_tokenizer
from flowspec.model.mask import causal_visible, tree_visible
from flowspec.model.registry import REGISTRY, cache_dir, list_models, model_fingerprint, resolve
from flowspec.model.shard import ensure_shards, read_manifest, split_model
from flowspec.model.stage import LMHead, StageModel

__all__ = [
    "REGISTRY", "Drafter", "KVCache", "LMHead", "ModelConfig", "StageModel", "cache_dir", "causal_visible",
    "ensure_shards", "list_models", "load_full", "load_head", "load_hf_reference", "load_stage", "load_tokenizer",
    "make_drafter", "model_fingerprint", "read_manifest", "resolve", "split_model", "tree_visible",
]
