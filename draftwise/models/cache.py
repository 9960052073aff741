"""Preallocated KV cache for one sequence.

Layout per layer: keys and values [num_kv_heads, max_len, head_dim]. ``length`` counts the
committed tokens. A forward of n new tokens (a chain or a draft tree) writes its entries into
slots [length, length + n) without committing them; ``commit(kept)`` then moves the accepted
nodes' rows to contiguous slots right after the committed prefix and advances ``length``. The
buffers are never reallocated.
"""
from __future__ import annotations

import torch

from draftwise.errors import PromptError


class KVCache:
    def __init__(self, num_layers: int, num_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (num_layers, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)   # [L, Hkv, T, D]
        self.v = torch.zeros(shape, dtype=dtype, device=device)   # [L, Hkv, T, D]
        self.max_len = max_len
        self.length = 0

    def reserve(self, n: int) -> int:
        """Check that n uncommitted entries fit; return the first slot they go to."""
        if self.length + n > self.max_len:
            raise PromptError(f"sequence of {self.length + n} tokens exceeds the KV cache of {self.max_len}")
        return self.length

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [Hkv, n, D] at slots [start, start+n); return all keys/values up to there."""
        end = start + k.shape[1]
        self.k[layer, :, start:end] = k
        self.v[layer, :, start:end] = v
        return self.k[layer, :, :end], self.v[layer, :, :end]

    def commit(self, kept: torch.Tensor | list[int] | int) -> None:
        """Keep the uncommitted entries at relative slots ``kept`` (ascending), in that order.

        An int n keeps the first n entries (a chain or a prefill).
        """
        if isinstance(kept, int):
            n = kept
        else:
            idx = torch.as_tensor(kept, dtype=torch.long)
            n = int(idx.numel())
            if n and not bool((idx == torch.arange(n)).all()):
                src = (idx + self.length).to(self.k.device)
                dst = slice(self.length, self.length + n)
                self.k[:, :, dst] = self.k[:, :, src]   # advanced indexing copies first: safe overlap
                self.v[:, :, dst] = self.v[:, :, src]
        if self.length + n > self.max_len:
            raise PromptError("commit past the end of the KV cache")
        self.length += n

    def truncate(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} committed tokens to {length}")
        self.length = length
