"""Sampling parameters and the warp from logits to probabilities (applied to target and draft alike)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from draftwise.errors import ConfigError

# A temperature below this divides logits into infinities (1e-320 is a denormal); 0 means greedy.
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-3, 100.0
MAX_SEED = 2**64 - 1                       # torch.Generator.manual_seed takes 64 bits


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0    # 0 = greedy
    top_k: int = 0              # 0 = off
    top_p: float = 1.0          # 1 = off
    seed: int | None = None

    def __post_init__(self):
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not (t == 0 or MIN_TEMPERATURE <= t <= MAX_TEMPERATURE):
            raise ConfigError(f"temperature must be 0 (greedy) or in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}], got {t!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or not 0 <= self.top_k <= 2**31 - 1:
            raise ConfigError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed <= MAX_SEED):
            raise ConfigError(f"seed must be an integer in [0, 2**64 - 1], got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generator(self, device="cpu") -> torch.Generator:
        g = torch.Generator(device=device)
        g.manual_seed(self.seed if self.seed is not None else torch.seed() % (2**63))
        return g


def warp(logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    """logits [..., V] -> probabilities [..., V] after temperature, top-k and top-p (fp32+)."""
    x = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    if s.greedy:
        return torch.nn.functional.one_hot(x.argmax(-1), x.shape[-1]).to(x.dtype)
    x = x / s.temperature
    if s.top_k and s.top_k < x.shape[-1]:
        kth = torch.topk(x, s.top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_x, idx = torch.sort(x, dim=-1, descending=True)
        probs = sorted_x.softmax(-1)
        cum = probs.cumsum(-1)
        remove = cum - probs >= s.top_p       # keep the smallest prefix whose mass reaches top_p
        remove[..., 0] = False
        sorted_x = sorted_x.masked_fill(remove, float("-inf"))
        x = torch.full_like(x, float("-inf")).scatter(-1, idx, sorted_x)
    return x.softmax(-1)


def sample(probs: torch.Tensor, g: torch.Generator) -> int:
    return int(torch.multinomial(probs, 1, generator=g))
