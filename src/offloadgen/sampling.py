"""Choosing the next token from logits: greedy, temperature, top-k, top-p."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .errors import OffloadgenError


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 means no limit
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # stop strings, not included in the text
    ignore_eos: bool = False  # benchmarks generate exactly max_new_tokens

    def __post_init__(self):
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int):
            raise OffloadgenError(f"max_new_tokens must be a whole number (got {self.max_new_tokens!r})")
        if self.max_new_tokens < 1:
            raise OffloadgenError(f"max_new_tokens must be at least 1 (got {self.max_new_tokens})")
        for name in ("temperature", "top_p"):
            if not math.isfinite(getattr(self, name)):  # NaN passes every comparison below
                raise OffloadgenError(f"{name} must be a finite number (got {getattr(self, name)})")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not -2**63 <= self.seed < 2**64):
            raise OffloadgenError(f"seed must be a whole number that fits in 64 bits (got {self.seed!r})")
        if self.temperature < 0:
            raise OffloadgenError(f"temperature must be >= 0 (got {self.temperature})")
        if not 0 < self.top_p <= 1:
            raise OffloadgenError(f"top_p must be in (0, 1] (got {self.top_p})")
        if self.top_k < 0:
            raise OffloadgenError(f"top_k must be >= 0 (got {self.top_k})")


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """logits [B, V] in float32 -> token ids [B]."""
    if params.temperature == 0:
        return logits.argmax(-1)
    logits = logits / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token once the tokens before it already reach top_p; the first always stays
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= params.top_p
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
