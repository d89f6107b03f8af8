"""The network, gpt-fast style: config, layers, a stage's block of layers with its explicit KV cache, the
head's lm_head, and drafters. Plain tensors in, plain tensors out; loading, converting and splitting weights is
the model store's job (flowspec.store). See docs/ARCHITECTURE.md, "model/ API".
"""

from flowspec.model.config import ModelConfig
from flowspec.model.drafter import Drafter, DraftState, random_drafter_model
from flowspec.model.kv_cache import KVCache
from flowspec.model.stage import LMHead, StageModel

__all__ = ["DraftState", "Drafter", "KVCache", "LMHead", "ModelConfig", "StageModel", "random_drafter_model"]
