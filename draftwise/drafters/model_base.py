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
- draft text (a draft with another tokenizer, crossvocab.py): the cache rows hold the draft's own
  tokens for the committed text, re-synced at each catch-up (a few trailing rows may be fed again);
  tree nodes, in target ids, are fed as their shared draft ids.
- next position: the position of the row after the committed ones (the target's for a draft with
  the same tokenizer; the draft text's own count otherwise). When a draft's cache would overflow,
  the draft restarts from the context's last quarter of its length (it only proposes: any context is valid).

A subclass implements ``forward_draft`` (run its network on n new tokens at the cache's end) and
``draft`` (grow a tree from the catch-up output with ``step``).
"""
from __future__ import annotations

import abc

import torch

from draftwise.crossvocab import DraftText
from draftwise.drafters.base import Context, Drafter, Proposal
from draftwise.models.cache import KVCache
from draftwise.sampling import Sampling, warp
from draftwise.tree import DraftTree


class ModelDrafter(Drafter, metaclass=abc.ABCMeta):
    name = "model-drafter"
    # True: an accepted node's pending row becomes committed; False: every drafted row is dropped and the
    # accepted tokens are fed again at the next catch-up (rows computed from predicted inputs: EAGLE)
    keep_drafted_rows = True
    # True: a draft cache that would overflow restarts on the recent context from position 0 (a drafter
    # whose rows pair with the target's positions, EAGLE, keeps its positions and does not)
    restartable = True

    def __init__(self, cache: KVCache, window: int | None = None, text: DraftText | None = None):
        self.cache = cache
        self.window = window                     # most prompt tokens the first catch-up feeds (None: all)
        self.text = text                         # the draft's own tokens (a draft with another tokenizer)
        self.synced = 0                          # ctx.tokens[:synced] are accounted for in the draft cache
        self.fed: list[int] = []                 # tree node of each pending row, in row order
        self.fed_ids: list[int] = []             # the draft token of each pending row
        self.pos0 = 0                            # position of the cache's first row
        self.max_pos = cache.max_len             # positions the network takes (a subclass may lower it)

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
        self.synced = self.pos0 = 0
        self.fed, self.fed_ids = [], []
        if self.text is not None:
            self.text.reset()

    def lag(self, ctx: Context) -> int:
        if self.synced == 0 and self.cache.length == 0:            # the prompt's prefill (its last window tokens)
            return len(ctx.tokens) if self.window is None else min(len(ctx.tokens), self.window)
        return len(ctx.tokens) - self.synced

    @property
    def next_pos(self) -> int:
        return self.pos0 + self.cache.length

    def _start(self, ctx: Context, overflow: bool) -> None:
        """Where the draft cache begins: the prompt's start or its last ``window`` tokens (rows at their
        absolute positions), or, for a cache that would overflow, the context's last quarter of the
        cache's length from position 0."""
        self.cache.truncate(0)
        if self.text is not None:
            self.text.reset()
        n = len(ctx.tokens)
        keep = n if self.window is None else min(n, self.window)
        if overflow:
            keep = min(keep, self._room() // 4)
        self.synced = n - keep                   # older tokens never enter the draft cache
        self.pos0 = 0 if overflow else self.synced

    def _room(self) -> int:
        return min(self.cache.max_len, self.max_pos)

    def catch_up(self, ctx: Context):
        """Feed ctx.tokens[synced:] (never empty: the root is always new) and commit them."""
        self.cache.discard()
        self.fed, self.fed_ids = [], []
        if self.synced == 0:
            self._start(ctx, overflow=False)
        grow = 1 if self.text is None else 2               # another tokenizer may need more rows per token
        if self.restartable and self.next_pos + grow * (len(ctx.tokens) - self.synced) + 64 > self._room():
            self._start(ctx, overflow=True)
        new = ctx.tokens[self.synced:]
        if self.text is None:
            keep = self.cache.length
        else:
            keep, new = self.text.sync(new)
            self.cache.truncate(keep)
        dev = self.cache.k.device
        toks = torch.tensor(new, dtype=torch.long, device=dev)
        pos = torch.arange(self.pos0 + keep, self.pos0 + keep + len(new), device=dev)
        out = self.forward_draft(toks, pos, None, ctx, catch_up=True)
        self.cache.commit(len(new))
        self.synced = len(ctx.tokens)
        return out

    def step(self, tree: DraftTree, nodes: list[int], ctx: Context, draft_ids: bool = False):
        """Feed tree nodes (all of whose ancestors except the root were fed before) as pending rows.
        draft_ids: the tree's tokens are the draft's own ids already (else target ids, translated for a
        draft with another tokenizer)."""
        dev = self.cache.k.device
        idx = torch.tensor(nodes, dtype=torch.long)
        toks = tree.tokens[idx].to(dev)
        if self.text is not None and not draft_ids:
            toks = self.text.bridge.t2d_on(dev)[toks]
        pos = (tree.depths[idx] + (self.next_pos - 1)).to(dev)
        if len(nodes) == 1 and len(self.fed) == int(tree.depths[nodes[0]]) - 1:
            mask = None                          # a chain: every pending row is an ancestor
        else:
            anc = tree.ancestor_mask()           # [N, N]
            cols = torch.tensor(self.fed + nodes, dtype=torch.long, device=anc.device)
            mask = anc[idx.to(anc.device)][:, cols]
        out = self.forward_draft(toks, pos, mask, ctx, catch_up=False)
        self.cache.hold(len(nodes))
        self.fed.extend(nodes)
        if self.text is not None:
            self.fed_ids.extend(toks.tolist())
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
        if self.text is not None:
            self.text.ids.extend(self.fed_ids[r] for r in rows)
        self.fed, self.fed_ids = [], []


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
