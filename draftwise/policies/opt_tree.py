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
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from draftwise.tree import DraftTree


def grow(root: int, probs: torch.Tensor, draft_layer: Callable[[DraftTree, list[int]], torch.Tensor],
         width: int, max_depth: int, delta: float, ids: torch.Tensor | None = None) -> DraftTree:
    """probs [1, K]: the draft's distribution after the root. draft_layer(tree, nodes) runs one
    draft forward over `nodes` and returns their next-token distributions [len(nodes), K].
    ids [K]: full-vocabulary id of each draft column (a vocabulary subset) or None.
    Returns the whole drafted tree (root first, layers in order) with scores = p̂."""
    tokens, parents = [root], [-1]
    scores = torch.ones(1, dtype=torch.float64)
    layer = [0]
    best = 0.0
    for depth in range(1, max_depth + 1):
        cand = scores[layer].unsqueeze(1) * probs.double().cpu()             # [len(layer), K]
        k = min(width, cand.numel())
        vals, flat = cand.flatten().topk(k)
        rows, cols = (flat // cand.shape[1]).tolist(), flat % cand.shape[1]
        toks = (cols if ids is None else ids.cpu()[cols]).tolist()
        new = list(range(len(tokens), len(tokens) + k))
        tokens += toks
        parents += [layer[r] for r in rows]
        scores = torch.cat([scores, vals])
        e = float(scores[1:].topk(min(width, scores.numel() - 1)).values.sum())
        if e - best <= delta or depth == max_depth:
            break
        best = e
        layer = new
        probs = draft_layer(DraftTree.from_parents(tokens, parents), layer)
    return DraftTree.from_parents(tokens, parents, scores=scores.float())


def top_nodes(tree: DraftTree, m: int) -> torch.Tensor:
    """Sorted node indices of the root and the m nodes with the largest p̂ (closed under parents)."""
    s = tree.scores[1:].cpu()
    order = torch.sort(-s, stable=True).indices[:m] + 1
    return torch.sort(torch.cat([torch.zeros(1, dtype=torch.long), order])).values
