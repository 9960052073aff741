"""The drafter interface: where candidate tokens come from."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from draftwise.sampling import Sampling
from draftwise.tree import DraftTree


@dataclass
class Context:
    """What a drafter may look at when proposing. tokens[-1] is the root (not yet in the cache)."""
    tokens: list[int]
    sampling: Sampling
    model: object = None                 # the target Transformer
    cache: object = None                 # the target KVCache (committed prefix = tokens[:-1])
    remaining: int = 1 << 30             # tokens still allowed before max_new_tokens
    _arr: np.ndarray | None = field(default=None, repr=False)

    @property
    def root(self) -> int:
        return self.tokens[-1]

    def array(self) -> np.ndarray:
        """tokens as an int64 numpy array (cached, extended incrementally)."""
        if self._arr is None or self._arr.size > len(self.tokens):
            self._arr = np.asarray(self.tokens, dtype=np.int64)
        elif self._arr.size < len(self.tokens):
            self._arr = np.concatenate([self._arr, np.asarray(self.tokens[self._arr.size:], dtype=np.int64)])
        return self._arr


class Drafter:
    """Base class and the empty drafter (plain autoregressive decoding)."""

    name = "ar"

    def reset(self, ctx: Context) -> None:
        """Called once per prompt, before prefill."""

    def propose(self, ctx: Context) -> DraftTree:
        return DraftTree.root_only(ctx.root, device=ctx.model.device if ctx.model is not None else "cpu")

    def observe(self, tree: DraftTree, logits: torch.Tensor, accepted, ctx: Context) -> None:
        """Called after each target pass with the target's logits at every node [n, V]."""

    def describe(self) -> dict:
        return {"method": self.name}
