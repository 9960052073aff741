"""Base for drafters that run a network with their own KV cache: a draft model, an EAGLE-style
head, early-exit layers. One base, thin subclasses (vLLM's ``SpecDecodeBaseProposer`` pattern).

Terms
- draft cache: the drafter's own KVCache. Its committed rows are ctx.tokens[:synced].
- catch-up: at each proposal, one forward over ctx.tokens[synced:] (the accepted tokens that were
  never fed, the bonus token and the root), committed. Its last row predicts the root's first
  child. The first catch-up of a prompt is the draft's prefill; with a ``window`` it reads only the
  prompt's last ``window`` tokens (a long prompt's prefill on the draft costs more than the draft
  saves over a short answer; the rows keep their absolute positions).
- step: a forward over new draft nodes written to the draft cache's pending region; they see the
  committed rows and, through a mask, the pending rows of their ancestors. Rows stay pending
  until the target's verdict.
- observe: the pending rows of accepted nodes become committed (no recompute); the rest are
  dropped. Subclasses never write rollback code.

A subclass implements ``forward_draft`` (run its network on n new tokens at the cache's end) and
``draft`` (grow a tree from the catch-up output with ``step``).
"""
from __future__ import annotations

import abc

import torch

from draftwise.drafters.base import Context, Drafter, Proposal
from draftwise.models.cache import KVCache
from draftwise.sampling import Sampling, warp
from draftwise.tree import DraftTree


class ModelDrafter(Drafter, metaclass=abc.ABCMeta):
    name = "model-drafter"
    # True: an accepted node's pending row becomes committed; False: every drafted row is dropped and the
    # accepted tokens are fed again at the next catch-up (rows computed from predicted inputs: EAGLE)
    keep_drafted_rows = True

    def __init__(self, cache: KVCache, window: int | None = None):
        self.cache = cache
        self.window = window                     # most prompt tokens the first catch-up feeds (None: all)
        self.synced = 0                          # ctx.tokens[:synced] are accounted for in the draft cache
        self.fed: list[int] = []                 # tree node of each pending row, in row order

    # ------------------------------------------------------------------ subclass hooks
    @abc.abstractmethod
    def forward_draft(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None,
                      ctx: Context, catch_up: bool):
        """Run the network on tokens [n] at positions [n], writing rows at self.cache.end;
        mask [n, pending + n] or None (causal). Returns a ForwardOut-like object whose ``logits``
        hold the draft logits of every row (a catch-up may return only its last row)."""

    @abc.abstractmethod
    def draft(self, ctx: Context, first) -> DraftTree | Proposal:
        """Grow the draft from ``first`` (the catch-up output: its last logits row predicts the
        root's first child), calling ``self.step`` for each new layer of nodes."""

    # ------------------------------------------------------------------ machinery
    def reset(self, ctx: Context) -> None:
        self.cache.truncate(0)
        self.synced = 0
        self.fed = []

    def catch_up(self, ctx: Context):
        """Feed ctx.tokens[synced:] (never empty: the root is always new) and commit them."""
        self.cache.discard()
        self.fed = []
        if self.synced == 0 and self.window is not None and len(ctx.tokens) > self.window:
            self.synced = len(ctx.tokens) - self.window        # older tokens never enter the draft cache
        new = ctx.tokens[self.synced:]
        dev = self.cache.k.device
        toks = torch.tensor(new, dtype=torch.long, device=dev)
        pos = torch.arange(self.synced, self.synced + len(new), device=dev)
        out = self.forward_draft(toks, pos, None, ctx, catch_up=True)
        self.cache.commit(len(new))
        self.synced = len(ctx.tokens)
        return out

    def step(self, tree: DraftTree, nodes: list[int], ctx: Context):
        """Feed tree nodes (all of whose ancestors except the root were fed before) as pending rows."""
        dev = self.cache.k.device
        idx = torch.tensor(nodes, dtype=torch.long)
        toks = tree.tokens[idx].to(dev)
        pos = (tree.depths[idx] + (len(ctx.tokens) - 1)).to(dev)
        if len(nodes) == 1 and len(self.fed) == int(tree.depths[nodes[0]]) - 1:
            mask = None                          # a chain: every pending row is an ancestor
        else:
            anc = tree.ancestor_mask()           # [N, N]
            cols = torch.tensor(self.fed + nodes, dtype=torch.long, device=anc.device)
            mask = anc[idx.to(anc.device)][:, cols]
        out = self.forward_draft(toks, pos, mask, ctx, catch_up=False)
        self.cache.hold(len(nodes))
        self.fed.extend(nodes)
        return out

    def select(self, tree: DraftTree, keep: torch.Tensor) -> DraftTree:
        """tree.select(keep) for a tree whose nodes were fed: the pending rows take the kept nodes'
        new numbers (a dropped node's row gets one no path holds), so ``observe`` commits the right rows."""
        new = {int(i): j for j, i in enumerate(keep.tolist())}
        self.fed = [new.get(i, -1 - i) for i in self.fed]
        return tree.select(keep)

    def propose(self, ctx: Context) -> DraftTree | Proposal:
        first = self.catch_up(ctx)
        return self.draft(ctx, first)

    def observe(self, tree: DraftTree, out, accepted, ctx: Context) -> None:
        row_of = {node: r for r, node in enumerate(self.fed)} if self.keep_drafted_rows else {}
        rows = []
        for node in accepted.path[1:]:
            if node not in row_of:
                break
            rows.append(row_of[node])
        self.cache.commit(rows)                  # drops every other pending row
        self.synced += len(rows)
        self.fed = []


def next_token(logits: torch.Tensor, sampling: Sampling, g: torch.Generator | None,
               ids: torch.Tensor | None, vocab_size: int) -> tuple[int, float, torch.Tensor | None]:
    """One chain-draft token from draft logits [K] (over the vocabulary subset ``ids`` [K] on the
    CPU, or the full vocabulary when None): (token, the draft's top probability, q over the full
    vocabulary [V] or None when greedy; g None means greedy).

    Stopping looks at top probabilities, never at a drawn token's own value: a draw kept or
    dropped by its own value would no longer follow q, and sampling would stop being exact."""
    if g is None:
        probs = logits.float().softmax(-1)
        j = int(probs.argmax())
        return (j if ids is None else int(ids[j])), float(probs[j]), None
    q = warp(logits, sampling).double().cpu()
    top = float(q.max())
    j = int(torch.multinomial(q, 1, generator=g))
    if ids is not None:
        q = q.new_zeros(vocab_size).index_copy_(0, ids, q)
        j = int(ids[j])
    return j, top, q
