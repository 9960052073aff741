"""The drafter interface: where candidate tokens come from, and what a drafter gets in return.

Terms
- root: the newest token (ctx.tokens[-1]); emitted already, not yet in the target's KV cache.
- proposal: a DraftTree rooted at the root, plus optional verification settings.
- forward result: the target's ForwardOut of a pass (logits at every node, final-norm hidden
  states, and the hidden states of the layers the drafter declared in ``needs``).

The loop calls, per prompt: ``reset(ctx)``; prefill; ``begin(ctx, prefill_out)``; then per step
``propose(ctx)`` -> one target pass over the tree -> verification -> ``observe(tree, out,
accepted, ctx)``. Drafters never touch the target's committed cache; a drafter that drafts with
the target's own first layers (early exit) may write pending rows and say so in its proposal.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from draftwise.drafters.spec import MethodSpec
from draftwise.sampling import Sampling
from draftwise.tree import DraftTree


@dataclass(frozen=True)
class Needs:
    """What a drafter needs from the target's passes (declared on the class, like HF's
    ``requires_model_outputs``). The final-norm hidden states always come with a forward."""
    hidden_layers: tuple[int, ...] = ()   # outputs of these decoder layers, in ForwardOut.layer_hidden
    final_hidden: bool = False            # uses ForwardOut.hidden (EAGLE features, LDLP)


@dataclass
class Proposal:
    """A draft tree and how to verify it.

    start_layer > 0 (early-exit self-drafting): the drafter already ran the target's layers
    [0, start_layer) over every tree node. Their KV rows sit, in tree order, in the target cache's
    pending slots [length, length + n) (cache.pending == n), and ``hidden_in`` [n, D] is the
    input of layer start_layer for each node. The verification pass then runs only the layers
    from start_layer on.
    """
    tree: DraftTree
    start_layer: int = 0
    hidden_in: torch.Tensor | None = None    # [n, D]


@dataclass
class Context:
    """What a drafter may look at when proposing. tokens[-1] is the root (not yet in the cache)."""
    tokens: list[int]
    sampling: Sampling
    model: object = None                 # the target Transformer
    cache: object = None                 # the target KVCache (committed prefix = tokens[:-1])
    remaining: int = 1 << 30             # tokens still allowed before max_new_tokens
    last_pass: tuple[int, float] | None = None   # (nodes, ms) of the latest target pass, verification included
    _arr: np.ndarray | None = field(default=None, repr=False)

    @property
    def root(self) -> int:
        return self.tokens[-1]

    @property
    def device(self) -> torch.device:
        return self.model.device if self.model is not None else torch.device("cpu")

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
    needs = Needs()
    # the loop may skip this drafter for some steps (the throughput guard's plain steps: neither propose
    # nor observe is called) and its next propose still drafts correctly from ctx.tokens
    pausable = True
    # names of the bits of DraftTree.origin, for drafters that mix sources: the loop counts accepted
    # tokens per source (Stats.sources)
    origin_bits: dict[int, str] = {}
    # the vocabulary subset whose ids index ``node_dists``' columns (None: the full vocabulary)
    subset = None

    def reset(self, ctx: Context) -> None:
        """Called once per prompt, before prefill."""

    def begin(self, ctx: Context, out) -> None:
        """Called once per prompt after prefill with its ForwardOut (logits of the last prompt
        position [1, V], hidden states of every prompt position [n, D], declared layers)."""

    def propose(self, ctx: Context) -> DraftTree | Proposal:
        return DraftTree.root_only(ctx.root, device=ctx.device)

    def observe(self, tree: DraftTree, out, accepted, ctx: Context) -> None:
        """Called after each target pass with its ForwardOut (out.logits [n, V] at every node) and
        the accepted path; ctx.tokens already ends with the accepted tokens and the bonus."""

    def watch(self, tree: DraftTree, out, accepted, ctx: Context) -> None:
        """Called instead of ``observe`` after a step this drafter did not draft (the guard's plain step, or
        another source's tree in ``auto``; ``propose`` was not called): a drafter that learns from the
        target's passes (Token Recycling's matrix, EAGLE's features) may learn from it."""

    def describe(self) -> dict:
        return {"method": self.name}

    # ------------------------------------------------------------------ composition hooks (RASD, auto)
    def lag(self, ctx: Context) -> int:
        """Context tokens this drafter's next proposal must feed its own network first (a model drafter's
        catch-up: after steps it did not draft, or the prompt); 0 for a drafter without a network."""
        return 0

    def offered(self, scores: np.ndarray) -> None:
        """Another source will verify nodes with these expected acceptances [m] beside this drafter's
        next tree; a drafter that sizes its tree by expected gain may grow less. Called before ``propose``."""

    def extended(self, out, rows: list[int], ctx: Context) -> None:
        """After ``observe``: the pass's rows ``rows`` (nodes another source hung below this drafter's
        accepted path, accepted as well) were committed after that path, in this order. A drafter that
        keeps per-token state from the target's passes (EAGLE's features) appends theirs."""

    def node_dists(self) -> dict[int, torch.Tensor]:
        """The draft distribution after each node of the last proposed tree (node -> [K] probabilities
        over ``subset``'s ids, or the full vocabulary); empty for a drafter without a model."""
        return {}


def _ar(engine) -> Drafter:
    return Drafter()


SPEC = MethodSpec("ar", "plain autoregressive decoding (the baseline; no drafts)", _ar)
