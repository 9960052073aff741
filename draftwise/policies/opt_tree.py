"""OPT-Tree (arXiv 2406.17276): grow a draft tree layer by layer to maximize the expected
acceptance length, for any draft model; plus the hardware-aware planner that decides, from the
measured cost curves of both models, how far to grow and how much of the tree to verify.

Terms
- p̂(node): the product of the draft's acceptance estimates along the node's path (root: 1).
  E[accepted tokens] ≈ Σ p̂ over the tree's nodes. Raw OPT-Tree uses draft probabilities;
  with ``Calibration`` (ours) the estimates are learned acceptance rates.
- width n: candidates kept per layer (the paper keeps the global top n of the n x K children
  and uses the same n as the node budget: 50-60 on a GPU).
- frontier: the newest layer's nodes, best first; the next draft forward runs over its top w.
- E: the sum of the n largest p̂ over all nodes drafted so far.

One draft forward per layer, over the expanded nodes of the newest layer at once (tree mask over
the draft cache's pending rows); their n x K candidates p̂(parent) · p(child) give the next
layer as their global top n. The official code runs a draft forward over the newest layer and
then discards it when E stops growing; here the gain of a layer is known from the forward of its
parents, so the stop is decided before that forward: no draft forward is ever thrown away.
The final tree is the top nodes by p̂ over all layers, a connected tree because p̂ never grows
along a path (a parent sorts before its child; ties keep index order).

Stopping rules
- ``DeltaStop`` (the paper): stop when a layer raises E by δ or less; else expand the whole layer.
- ``TopNStop`` (fixed max_nodes): grow while the newest layer still places nodes in the top n.
- ``Planner`` (ours, the default): the paper's δ ∈ (μ, 1), μ = draft step / target step, is a
  cost ratio; the planner uses the two measured curves themselves. A step of the draft model
  costs spent + t_draft(w) per further layer of w nodes, and its tree of m nodes costs
  t_target(m + 1); it expects 1 + Σ p̂ tokens. Before each draft forward it compares the best
  tokens-per-ms of the tree it holds against the best it can expect after expanding the top w
  frontier nodes (w in 1, 2, 4, ...), where each expanded node's best child is predicted to keep
  a fraction ``a`` of its p̂ (a = the running mean acceptance of drafted top choices) and the best
  path may go on as a chain for the remaining depth (so a flat stretch of t_target is not
  mistaken for the end of the road). w = 0 (stop) wins unless drafting on is expected to pay.
  The final size m maximizes (1 + Σ_{i<=m} p̂_i) / (spent + t_target(m + 1)).

Calibration (ours): under greedy verification a draft token is accepted when it equals the
target's argmax, which happens far more often than the draft's probability says for its top
choice (0.5B drafting for the 1.5B: τ 4.8 from 5-token chains while p̂ of the 5th token is often
below 0.3) and less often for the others. ``Calibration`` learns, online, how acceptance relates
to the draft probability, by (top choice or not, probability decile), starting from the
probability itself; p̂ then multiplies these rates instead of raw probabilities.
"""
from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch

from draftwise.tree import DraftTree


class Calibration:
    """Acceptance rate of a drafted node given its parent was accepted, learned online per
    (top choice of its parent or not, draft-probability decile) as a factor on the probability:
    rate = min(1, p · (accepted + w) / (Σ p of the proposed + w)); with no evidence, rate = p.
    A factor (not a rate per cell) keeps the order of the draft's probabilities inside a cell, so a
    token of probability ~0 never inherits its decile's acceptance rate."""

    def __init__(self, buckets: int = 10, prior_weight: float = 4.0):
        self.b, self.w = buckets, prior_weight
        self.proposed = torch.zeros(2, buckets, dtype=torch.float64)
        self.accepted = torch.zeros(2, buckets, dtype=torch.float64)
        self.psum = torch.zeros(2, buckets, dtype=torch.float64)
        self._factors: list[list[float]] | None = None     # factor() as lists, until the next update

    def _cell(self, top1: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (~top1).long(), (p * self.b).long().clamp_(0, self.b - 1)

    def factor(self) -> torch.Tensor:
        return (self.accepted + self.w) / (self.psum + self.w)         # [2, buckets]

    def rate(self, top1: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        r, b = self._cell(top1, p)
        return (p * self.factor()[r, b]).clamp_(max=1.0)

    def rate_one(self, top1: bool, p: float) -> float:
        """rate() of one node in plain Python (the same float64 arithmetic, so the same value)."""
        if self._factors is None:
            self._factors = self.factor().tolist()
        return min(p * self._factors[0 if top1 else 1][min(max(int(p * self.b), 0), self.b - 1)], 1.0)

    def update(self, top1: torch.Tensor, p: torch.Tensor, accepted: torch.Tensor) -> None:
        self._factors = None
        r, b = self._cell(top1, p)
        self.proposed.index_put_((r, b), torch.ones_like(p), accumulate=True)
        self.accepted.index_put_((r, b), accepted.double(), accumulate=True)
        self.psum.index_put_((r, b), p.double(), accumulate=True)


class DeltaStop:
    """The paper's rule: expand the whole newest layer while it raised E by more than δ."""

    def __init__(self, delta: float, width: int):
        self.delta, self.width, self.best = delta, width, 0.0

    def begin(self, context: int) -> None:
        self.best = 0.0

    def expand(self, scores: torch.Tensor, frontier: torch.Tensor, depth_left: int) -> int:
        e = float(scores[1:].topk(min(self.width, scores.numel() - 1)).values.sum())
        gain, self.best = e - self.best, e
        return 0 if gain <= self.delta else frontier.numel()


class TopNStop:
    """A fixed node budget n: expand the newest layer's nodes that rank among the n best of the
    whole tree so far (ties: older nodes first, as in ``top_nodes``); stop when none does. A node
    outside the top n can have no child inside it (p̂ never grows along a path), so growth ends
    exactly when the final top-n tree is settled, with no forward spent on nodes it drops."""

    def __init__(self, n: int):
        self.n = n

    def begin(self, context: int) -> None:
        pass

    def expand(self, scores: torch.Tensor, frontier: torch.Tensor, depth_left: int) -> int:
        rest = scores[1:]
        order = torch.sort(-rest, stable=True).indices[: self.n]
        first_new = rest.numel() - frontier.numel()
        return int((order >= first_new).sum())


class Planner:
    """Hardware-aware growth and tree size from the target's and the draft's cost curves (see the
    module docstring). ``begin`` at the start of each proposal (starts the clock: the catch-up
    forward and every layer so far count as spent)."""

    def __init__(self, target_cost, draft_cost, widths: tuple[int, ...] = (1, 2, 4, 8), a: float = 0.7,
                 alpha: float = 0.05):
        self.target_cost, self.draft_cost = target_cost, draft_cost
        self.widths, self.a, self.alpha = widths, a, alpha
        self.context, self.t0 = 0, 0.0
        self.extra = np.empty(0)        # p̂ of nodes another source adds to this step's tree (RASD)

    def begin(self, context: int, t0: float | None = None) -> None:
        """Start a proposal's clock; ``extra`` (other nodes this step will verify) stays until set again."""
        self.context, self.t0 = context, time.perf_counter() if t0 is None else t0

    def spent(self) -> float:
        return (time.perf_counter() - self.t0) * 1e3

    def drafting_can_pay(self, context: int) -> bool:
        """An accepted draft token saves at most one target pass, so a draft step that costs as much as a
        plain target pass never pays, whatever the acceptance (a 0.5B draft for the 135M SmolLM2)."""
        return float(self.draft_cost.t(1, context)) < float(self.target_cost.t(1, context))

    def learn(self, top_child_rate: float) -> None:
        """Running mean of the acceptance estimate of the best child of an expanded node."""
        self.a = (1 - self.alpha) * self.a + self.alpha * float(top_child_rate)

    def _best(self, gains: np.ndarray, spent: float) -> tuple[float, int]:
        """(best tokens per ms, its size m) over prefixes of gains (sorted, best first)."""
        m = np.arange(gains.size + 1)
        expected = 1.0 + np.concatenate([[0.0], np.cumsum(gains)])
        rate = expected / (spent + self.target_cost.t(m + 1, self.context))
        i = int(np.argmax(rate))
        return float(rate[i]), i

    def size(self, gains: np.ndarray) -> int:
        """How many of the nodes (gains sorted, best first) to verify."""
        return self._best(np.asarray(gains, dtype=float), self.spent())[1]

    def expand(self, scores: torch.Tensor, frontier: torch.Tensor, depth_left: int) -> int:
        """scores [n]: p̂ of every node (root first); frontier [f]: the newest layer's p̂, best first."""
        spent = self.spent()
        held = np.sort(np.concatenate([scores[1:].double().cpu().numpy(), self.extra]))[::-1]
        f = frontier.double().cpu().numpy()
        best_rate, _ = self._best(held, spent)
        choice = 0
        for w in self.widths:
            if w > f.size:
                break
            cost = spent + float(self.draft_cost.t(w, self.context))
            chain = f[0] * self.a ** np.arange(2, depth_left + 1)            # the best path, continued
            step = float(self.draft_cost.t(1, self.context))
            for j in range(chain.size + 1):
                gains = np.sort(np.concatenate([held, f[:w] * self.a, chain[:j]]))[::-1]
                rate, _ = self._best(gains, cost + j * step)
                if rate > best_rate * (1 + 1e-9):
                    best_rate, choice = rate, w
        return choice


def grow(root: int, probs: torch.Tensor, draft_layer: Callable[[DraftTree, list[int]], torch.Tensor],
         width: int, max_depth: int, stop, ids: torch.Tensor | None = None,
         calib: Calibration | None = None) -> tuple[DraftTree, torch.Tensor, torch.Tensor]:
    """probs [1, K]: the draft's distribution after the root. draft_layer(tree, nodes) runs one
    draft forward over `nodes` and returns their next-token distributions [len(nodes), K].
    stop: DeltaStop or Planner (its ``expand`` says how many frontier nodes the next forward
    takes; 0 ends growth). ids [K]: full-vocabulary id of each draft column (a vocabulary subset)
    or None. Returns the whole drafted tree (root first, layers in order, each layer best first)
    with scores = p̂ (calibrated when calib is given), and per node: top1 [n] bool (its parent's
    top choice) and p [n] (its raw draft probability) for Calibration.update."""
    tokens, parents = [root], [-1]
    scores = torch.ones(1, dtype=torch.float64)
    top1s, ps = [torch.ones(1, dtype=torch.bool)], [torch.ones(1, dtype=torch.float64)]
    expanded = [0]
    ids_cpu = None if ids is None else ids.cpu()
    for depth in range(1, max_depth + 1):
        probs = probs.double().cpu()                                          # [len(expanded), K]
        is_top = torch.zeros_like(probs, dtype=torch.bool)
        is_top[torch.arange(probs.shape[0]), probs.argmax(1)] = True
        rate = probs if calib is None else calib.rate(is_top, probs)
        rate = torch.minimum(rate, rate[is_top].unsqueeze(1))             # never above its parent's top choice
        if isinstance(stop, Planner):
            stop.learn(float(rate[is_top][0]))                               # the best node's top child
        cand = scores[expanded].unsqueeze(1) * rate                           # [len(expanded), K]
        k = min(width, cand.numel())
        vals, flat = cand.flatten().topk(k)                                   # best first
        rows_t, cols = flat // cand.shape[1], flat % cand.shape[1]
        new = list(range(len(tokens), len(tokens) + k))
        tokens += (cols if ids_cpu is None else ids_cpu[cols]).tolist()
        parents += [expanded[r] for r in rows_t.tolist()]
        scores = torch.cat([scores, vals])
        top1s.append(is_top[rows_t, cols])
        ps.append(probs[rows_t, cols])
        if depth == max_depth:
            break
        w = stop.expand(scores, vals, max_depth - depth)
        if w <= 0:
            break
        expanded = new[:w]
        probs = draft_layer(DraftTree.from_parents(tokens, parents), expanded)
    tree = DraftTree.from_parents(tokens, parents, scores=scores.float())
    return tree, torch.cat(top1s), torch.cat(ps)


def top_nodes(tree: DraftTree, m: int) -> torch.Tensor:
    """Sorted node indices of the root and the m nodes with the largest p̂ (closed under parents)."""
    s = tree.scores[1:].cpu()
    order = torch.sort(-s, stable=True).indices[:m] + 1
    return torch.sort(torch.cat([torch.zeros(1, dtype=torch.long), order])).values
