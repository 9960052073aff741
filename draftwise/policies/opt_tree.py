"""OPT-Tree (arXiv 2406.17276): grow a draft tree layer by layer to maximize the expected
acceptance length, for any draft model.

Terms
- p̂(node): the product of the draft's probabilities along the node's path (the root has 1).
  E[accepted tokens] ≈ Σ p̂ over the tree's nodes.
- width n: nodes kept per layer, and the node budget of the final tree (the official code uses
  one number for both: 50 on a GPU).
- E: the sum of the n largest p̂ over all nodes drafted so far; a new layer is worth drafting on
  only while it raises E by more than δ (the paper: δ in (μ, 1), μ = draft step / target step).

One draft forward per layer, over all nodes of the newest layer at once (tree mask over the
draft cache's pending rows); its n x K candidates p̂(parent) · p(child) give the next layer as
their global top n. The official code runs a draft forward over the newest layer and then
discards it when E stops growing; here the gain of a layer is known from the forward of its
parents, so the stop is decided before that forward: no wasted draft forward per step.
The final tree is the top nodes by p̂ over all layers, a connected tree because p̂ never grows
along a path (a parent sorts before its child; ties keep index order).

Calibration (ours): under greedy verification a draft token is accepted when it equals the
target's argmax, which happens far more often than the draft's probability says for its top
choice (0.5B drafting for the 1.5B: τ 4.8 from 5-token chains while p̂ of the 5th token is often
below 0.3) and less often for the others. ``Calibration`` learns, online, the acceptance rate of
a node given its parent was accepted, by (top choice or not, draft probability decile), starting
from the probability itself; p̂ then multiplies these rates instead of raw probabilities.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from draftwise.tree import DraftTree


class Calibration:
    """Acceptance rate of a drafted node given its parent was accepted, learned online per
    (top choice of its parent or not, draft-probability decile); prior = the probability."""

    def __init__(self, buckets: int = 10, prior_weight: float = 4.0):
        self.b, self.w = buckets, prior_weight
        self.proposed = torch.zeros(2, buckets, dtype=torch.float64)
        self.accepted = torch.zeros(2, buckets, dtype=torch.float64)

    def _cell(self, top1: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (~top1).long(), (p * self.b).long().clamp_(0, self.b - 1)

    def rate(self, top1: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        r, b = self._cell(top1, p)
        return (self.accepted[r, b] + self.w * p) / (self.proposed[r, b] + self.w)

    def update(self, top1: torch.Tensor, p: torch.Tensor, accepted: torch.Tensor) -> None:
        r, b = self._cell(top1, p)
        self.proposed.index_put_((r, b), torch.ones_like(p), accumulate=True)
        self.accepted.index_put_((r, b), accepted.double(), accumulate=True)


def grow(root: int, probs: torch.Tensor, draft_layer: Callable[[DraftTree, list[int]], torch.Tensor],
         width: int, max_depth: int, delta: float, ids: torch.Tensor | None = None,
         calib: Calibration | None = None) -> tuple[DraftTree, torch.Tensor, torch.Tensor]:
    """probs [1, K]: the draft's distribution after the root. draft_layer(tree, nodes) runs one
    draft forward over `nodes` and returns their next-token distributions [len(nodes), K].
    ids [K]: full-vocabulary id of each draft column (a vocabulary subset) or None.
    Returns the whole drafted tree (root first, layers in order) with scores = p̂ (calibrated
    when calib is given), and per node: top1 [n] bool (its parent's top choice) and p [n] (its
    raw draft probability) for Calibration.update."""
    tokens, parents = [root], [-1]
    scores = torch.ones(1, dtype=torch.float64)
    top1s, ps = [torch.ones(1, dtype=torch.bool)], [torch.ones(1, dtype=torch.float64)]
    layer = [0]
    best = 0.0
    for depth in range(1, max_depth + 1):
        probs = probs.double().cpu()                                          # [len(layer), K]
        is_top = torch.zeros_like(probs, dtype=torch.bool)
        is_top[torch.arange(probs.shape[0]), probs.argmax(1)] = True
        rate = probs if calib is None else calib.rate(is_top, probs)
        cand = scores[layer].unsqueeze(1) * rate                              # [len(layer), K]
        k = min(width, cand.numel())
        vals, flat = cand.flatten().topk(k)
        rows_t, cols = flat // cand.shape[1], flat % cand.shape[1]
        rows = rows_t.tolist()
        toks = (cols if ids is None else ids.cpu()[cols]).tolist()
        new = list(range(len(tokens), len(tokens) + k))
        tokens += toks
        parents += [layer[r] for r in rows]
        scores = torch.cat([scores, vals])
        top1s.append(is_top[rows_t, cols])
        ps.append(probs[rows_t, cols])
        e = float(scores[1:].topk(min(width, scores.numel() - 1)).values.sum())
        if e - best <= delta or depth == max_depth:
            break
        best = e
        layer = new
        probs = draft_layer(DraftTree.from_parents(tokens, parents), layer)
    tree = DraftTree.from_parents(tokens, parents, scores=scores.float())
    return tree, torch.cat(top1s), torch.cat(ps)


def top_nodes(tree: DraftTree, m: int) -> torch.Tensor:
    """Sorted node indices of the root and the m nodes with the largest p̂ (closed under parents)."""
    s = tree.scores[1:].cpu()
    order = torch.sort(-s, stable=True).indices[:m] + 1
    return torch.sort(torch.cat([torch.zeros(1, dtype=torch.long), order])).values
