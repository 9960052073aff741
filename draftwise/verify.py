"""Lossless acceptance over a draft tree.

Greedy: node i is accepted when its token equals the target's argmax at its parent and its
parent is accepted; the deepest accepted node ends the path and the target's argmax there is
the bonus token. Fully vectorized: one host sync per step.

Sampling: recursive rejection sampling down the tree (SpecInfer / Medusa style). At the current
node with target distribution p, children are tried in node order; each child says whether it
is deterministic or was sampled (``DraftTree.is_sampled``), so one parent may mix both (a fused
retrieval + model tree):
  - a deterministic child x (one-hot q): accept with probability p(x); on rejection set
    p(x) = 0 and renormalize;
  - a child x drawn from the parent's known q (without replacement among its sampled siblings,
    in node order): accept with probability min(1, p(x)/q(x)); on rejection
    p <- norm(max(p - q, 0)), then q(x) <- 0, renormalized (the next sampled sibling's law).
  - a deterministic child whose token a deterministic sibling already tried is skipped (p(x) is
    0 by then, and max(p - q, 0) keeps it 0). A sampled child is never skipped, even when an
    earlier sibling had its token: the rejection and its residual update are what keep the
    emitted token's law exact (skipping it would continue with p instead of norm(max(p - q, 0))).
When no child is accepted the next token is drawn from the residual p. Either way the emitted
token has exactly the target's distribution.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from draftwise import kernels
from draftwise.sampling import Sampling, warp
from draftwise.tree import DraftTree


@dataclass
class Accepted:
    path: list[int]        # node indices from the root (inclusive) to the deepest accepted node
    tokens: list[int]      # accepted draft tokens (path without the root), then the bonus token
    bonus: int

    @property
    def num_accepted(self) -> int:
        """Draft tokens accepted (bonus excluded)."""
        return len(self.path) - 1


def verify_greedy(tree: DraftTree, logits: torch.Tensor) -> Accepted:
    """logits [n, V] from the target at every node."""
    best = kernels.argmax_rows(logits).tolist()                  # [n] (= logits.argmax(-1))
    if tree.size == 1:
        return Accepted([0], [best[0]], best[0])
    # plain Python over the n nodes (parents first): a handful of small tensor ops cost more per step
    toks, par, depth = tree.tokens.tolist(), tree.parents.tolist(), tree.depths.tolist()
    ok = [True] * len(toks)                                      # node accepted: its parent is, and its token
    node = 0                                                     # is the target's argmax there
    for i in range(1, len(toks)):
        ok[i] = ok[par[i]] and toks[i] == best[par[i]]
        if ok[i] and depth[i] > depth[node]:                     # the first deepest accepted node
            node = i
    path = tree.path_to(node)
    bonus = best[node]
    return Accepted(path, [toks[i] for i in path[1:]] + [bonus], bonus)


def verify_sampling(tree: DraftTree, logits: torch.Tensor | None, sampling: Sampling,
                    g: torch.Generator, probs: torch.Tensor | None = None) -> Accepted:
    """Recursive rejection sampling; logits [n, V] (or already warped probs [n, V]).

    Uses tree.q when the draft was sampled (q must be warped with the same Sampling).
    """
    if probs is None:
        probs = warp(logits, sampling).double().cpu()            # [n, V]
    q_all = None if tree.q is None else tree.q.double().cpu()    # already warped by the drafter
    is_sampled = tree.is_sampled().tolist()
    kids: dict[int, list[int]] = {}
    for i, p in enumerate(tree.parents.tolist()):
        if p >= 0:
            kids.setdefault(p, []).append(i)
    tokens = tree.tokens.tolist()
    node, path = 0, [0]
    while True:
        p = probs[node].clone()
        q = None if q_all is None else q_all[node].clone()
        seen_det: set[int] = set()            # deterministic tokens tried here: p(x) is 0 from then on
        nxt = None
        for c in kids.get(node, ()):
            x = tokens[c]
            if is_sampled[c]:
                u = torch.rand((), generator=g, dtype=torch.float64, device=p.device)
                ratio = p[x] / q[x] if q[x] > 0 else torch.tensor(1.0, dtype=p.dtype)
                if u < ratio:
                    nxt = c
                    break
                p = _renorm((p - q).clamp_(min=0))
                q[x] = 0.0
                q = _renorm(q)
            elif x not in seen_det:
                seen_det.add(x)
                u = torch.rand((), generator=g, dtype=torch.float64, device=p.device)
                if u < p[x]:
                    nxt = c
                    break
                p[x] = 0.0
                p = _renorm(p)
        if nxt is None:
            bonus = int(torch.multinomial(p if p.sum() > 0 else probs[node], 1, generator=g))
            return Accepted(path, [tokens[i] for i in path[1:]] + [bonus], bonus)
        node = nxt
        path.append(node)


def _renorm(p: torch.Tensor) -> torch.Tensor:
    s = p.sum()
    return p / s if s > 0 else p


def verify(tree: DraftTree, logits: torch.Tensor, sampling: Sampling, g: torch.Generator | None) -> Accepted:
    if sampling.greedy:
        return verify_greedy(tree, logits)
    assert g is not None
    return verify_sampling(tree, logits, sampling, g)
