"""Sampling settings and the next-token rule: greedy, or temperature with top-k / top-p."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from blockmem.errors import ConfigError


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0  # 1: no nucleus cut
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}", "0 means greedy decoding")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0, got {self.top_k}", "0 disables the top-k cut")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}", "1 disables the nucleus cut")
        if any(not s for s in self.stop):
            raise ConfigError("stop strings must not be empty")
        object.__setattr__(self, "stop", tuple(self.stop))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class Sampler:
    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.generator = torch.Generator()
        if params.seed is not None:
            self.generator.manual_seed(params.seed)
        else:
            self.generator.seed()

    def __call__(self, logits: torch.Tensor) -> int:
        """logits: [vocab] float32 (any device) -> the next token id."""
        if self.params.greedy:
            return int(logits.argmax())
        return int(torch.multinomial(self.probabilities(logits), 1, generator=self.generator))

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """The distribution sampled from, after temperature, top-k and top-p: [vocab] on CPU."""
        p = self.params
        scaled = logits.float().cpu() / p.temperature
        if 0 < p.top_k < scaled.numel():
            kth = torch.topk(scaled, p.top_k).values[-1]
            scaled = scaled.masked_fill(scaled < kth, -math.inf)
        probs = torch.softmax(scaled, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            before = sorted_probs.cumsum(0) - sorted_probs  # mass of strictly better tokens
            sorted_probs[before >= p.top_p] = 0.0  # keeps the smallest set reaching top_p
            probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
            probs = probs / probs.sum()
        return probs
