"""Choosing the next token from the target's logits, reproducibly.

Common random numbers: the uniform used for the token at absolute position `pos` is a pure function of
(seed, pos). Sampling `y ~ p` by inverse CDF with that uniform and then matching `y` against the drafted
children of the node is lossless (the output distribution is exactly `p`), and accepts a draft with total
probability `sum_children p(child)`, the same as EAGLE's multi-candidate rejection with deterministic drafts.
It also makes a seeded run independent of the mode, the tree budget and the timing of the pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flowspec.errors import ConfigError

__all__ = ["MAX_TEMPERATURE", "SamplingParams", "choose_token", "uniform"]

_MASK64 = (1 << 64) - 1
MAX_TEMPERATURE = 2.0  # OpenAI's bound; past it the target's distribution is all but uniform noise


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How the next token is chosen. The one rule for the sampling ranges: the command line, the API and the
    HTTP server all build one of these, so they refuse the same values with the same words."""

    temperature: float = 0.0  # 0 = greedy, token-identical to transformers generate(do_sample=False)
    top_p: float = 1.0  # nucleus mass kept; 1.0 keeps everything
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.temperature <= MAX_TEMPERATURE:  # NaN fails it too
            raise ConfigError(f"temperature must be >= 0 (0 = greedy) and <= {MAX_TEMPERATURE:g}, "
                              f"got {self.temperature:g}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1] (1 = no nucleus cut), got {self.top_p:g}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def uniform(seed: int, position: int) -> float:
    """A uniform in [0, 1) that depends only on (seed, position): 53 random bits of a counter-based hash."""
    return (_splitmix64(_splitmix64(seed & _MASK64) ^ (position & _MASK64)) >> 11) / float(1 << 53)


def warped_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """softmax(logits / T) restricted to the top-p nucleus (transformers' TopPLogitsWarper rule), float64."""
    scores = logits.double() / params.temperature
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        cumulative = sorted_scores.softmax(-1).cumsum(-1)
        remove_sorted = cumulative <= (1 - params.top_p)
        remove_sorted[-1] = False  # keep at least the most likely token
        remove = torch.zeros_like(remove_sorted).scatter(0, order, remove_sorted)
        scores = scores.masked_fill(remove, float("-inf"))
    return scores.softmax(-1)


def choose_token(logits: torch.Tensor, params: SamplingParams, position: int) -> int:
    """The token at absolute `position`, from the target's logits [V] after position - 1."""
    if params.greedy:
        return int(torch.argmax(logits))
    probs = warped_probs(logits, params)
    cdf = probs.cumsum(-1)
    u = uniform(params.seed, position) * float(cdf[-1])
    index = int(torch.searchsorted(cdf, torch.tensor([u], dtype=cdf.dtype), right=True)[0])
    index = min(index, probs.numel() - 1)
    while probs[index] == 0:  # u landed on a flat stretch of the CDF: step back to a real token
        index -= 1
    return index
