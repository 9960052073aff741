"""Preallocated KV cache for one sequence.

Layout per layer: keys and values [num_kv_heads, max_len, head_dim]. Slots are in three parts:

    [0, length)                     committed: the sequence so far
    [length, length + pending)      pending: uncommitted rows that later forwards still see
    [length + pending, ...)         scratch: where the next forward writes

A forward of n new tokens writes its rows to the scratch slots [length + pending, + n) and
attends to committed + pending + new (the pending/new part through a mask). A verification pass
uses no pending rows: ``commit(kept)`` moves the accepted rows to contiguous slots right after
the committed prefix. Drafting a tree layer by layer keeps each layer's rows with ``hold(n)``
(pending grows); ``keep(rows)`` compacts the pending rows to the chosen ones, ``commit(rows)``
makes them committed and ``discard()`` drops every pending row. The buffers are never
reallocated. ``spare`` slots past ``max_len`` are scratch only (the padded rows of a static-shape
forward land there, see models/graphs.py); the sequence itself never grows past ``max_len``.
"""
from __future__ import annotations

import torch

from draftwise.errors import CacheError


class KVCache:
    def __init__(self, num_layers: int, num_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", spare: int = 0):
        shape = (num_layers, num_kv_heads, max_len + spare, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)   # [L, Hkv, T, D]
        self.v = torch.zeros(shape, dtype=dtype, device=device)   # [L, Hkv, T, D]
        self.max_len = max_len
        self.length = 0      # committed rows
        self.pending = 0     # uncommitted rows visible to the next forward

    @property
    def capacity(self) -> int:
        """Slots in the buffers (max_len + spare)."""
        return self.k.shape[2]

    @property
    def end(self) -> int:
        """First scratch slot: where the next forward writes."""
        return self.length + self.pending

    def reserve(self, n: int) -> int:
        """Check that n more rows fit after committed + pending; return the first slot they go to."""
        if self.end + n > self.max_len:
            raise CacheError(f"{self.end + n} tokens (committed {self.length}, pending {self.pending}, "
                             f"new {n}) exceed the KV cache of {self.max_len}")
        return self.end

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [Hkv, n, D] at slots [start, start+n); return all keys/values up to there."""
        end = start + k.shape[1]
        self.k[layer, :, start:end] = k
        self.v[layer, :, start:end] = v
        return self.k[layer, :, :end], self.v[layer, :, :end]

    def hold(self, n: int) -> None:
        """Keep the n rows the last forward wrote as pending (visible to later forwards)."""
        if self.end + n > self.max_len:
            raise CacheError("hold past the end of the KV cache")
        self.pending += n

    def discard(self) -> None:
        """Drop every pending row (the data stays in memory until overwritten)."""
        self.pending = 0

    def _move(self, rel: torch.Tensor, layers: slice) -> None:
        """Copy rows length + rel (ascending) to length + 0..len(rel)-1 in the given layers."""
        n = int(rel.numel())
        if n and not bool((rel == torch.arange(n, device=rel.device)).all()):
            src = (rel + self.length).to(self.k.device)
            dst = slice(self.length, self.length + n)
            self.k[layers, :, dst] = self.k[layers, :, src]   # advanced indexing copies first: safe overlap
            self.v[layers, :, dst] = self.v[layers, :, src]

    def keep(self, rows: torch.Tensor | list[int], layers: slice = slice(None)) -> None:
        """Compact the pending region to ``rows`` (relative to ``length``, ascending), in that order."""
        idx = torch.as_tensor(rows, dtype=torch.long)
        if idx.numel() and (int(idx.max()) >= self.pending or int(idx.min()) < 0):
            raise CacheError(f"keep({idx.tolist()}) outside the {self.pending} pending rows")
        self._move(idx, layers)
        self.pending = int(idx.numel())

    def commit(self, kept: torch.Tensor | list[int] | int) -> None:
        """Make the uncommitted rows at relative slots ``kept`` (ascending) committed, in that order.

        An int n keeps the first n rows (a chain or a prefill). Pending rows not kept are dropped.
        """
        if isinstance(kept, int):
            n = kept
        else:
            idx = torch.as_tensor(kept, dtype=torch.long)
            n = int(idx.numel())
            self._move(idx, slice(None))
        if self.length + n > self.max_len:
            raise CacheError(f"commit of {n} rows past the end of the KV cache of {self.max_len}")
        self.length += n
        self.pending = 0

    def truncate(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} committed tokens to {length}")
        self.length = length
        self.pending = 0
