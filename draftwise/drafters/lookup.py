"""Prompt lookup decoding (PLD): draft the continuation of an earlier occurrence of the newest
n-gram in the prompt and generated text. Longest n first; several matches become a small trie.

Budget (ours): acceptance is tracked online per (depth, first-child-or-not); each step keeps the
nodes whose expected gain pays for their verification cost under the measured t(n).
"""
from __future__ import annotations

import numpy as np
import torch

from draftwise.datastore import brute_force_matches
from draftwise.drafters.base import Context, Drafter
from draftwise.drafters.spec import DECAY, MAX_NODES, MethodSpec, Option
from draftwise.errors import ConfigError
from draftwise.policies.budget import CostCurve, OnlineCost, Overhead, best_prefix, online_cost
from draftwise.tree import DraftTree, merge_tries


def find_matches(arr: np.ndarray, n: int, limit: int) -> np.ndarray:
    """Start indices i (most recent first) with arr[i:i+n] == arr[-n:] and i + n < len(arr)."""
    L = arr.size
    if L <= n:
        return np.empty(0, dtype=np.int64)
    return brute_force_matches(arr[: L - 1], arr[L - n:])[::-1][:limit]


class PromptLookup(Drafter):
    name = "lookup"

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1, max_depth: int = 16, max_matches: int = 4,
                 max_nodes: int | None = None, cost: CostCurve | OnlineCost | None = None, prior_weight: float = 4.0,
                 decay: float = 0.98):
        if not 1 <= min_ngram <= max_ngram:
            raise ConfigError("lookup needs 1 <= min_ngram <= max_ngram")
        if max_depth < 1 or max_matches < 1:
            raise ConfigError("lookup needs max_depth >= 1 and max_matches >= 1")
        self.max_ngram, self.min_ngram, self.max_depth = max_ngram, min_ngram, max_depth
        self.max_matches, self.max_nodes, self.cost, self.w = max_matches, max_nodes, cost, prior_weight
        self.decay = decay
        # online acceptance counts per [depth, first-child?]
        self.proposed = np.zeros((max_depth + 1, 2))
        self.accepted = np.zeros((max_depth + 1, 2))
        self.prior = np.array([[0.6 ** d, 0.3 * 0.6 ** d] for d in range(max_depth + 1)])
        self.overhead = Overhead()

    def continuations(self, arr: np.ndarray) -> list[list[int]]:
        """What follows the most recent occurrences of the longest suffix n-gram (max_ngram down to min_ngram)
        that occurred before: up to max_matches distinct continuations, most recent first. One scan of the
        context for the newest token, then each candidate's match length backwards (equal to find_matches per
        n, longest first, with one pass over the context instead of one per n)."""
        L = arr.size
        if L < 2:
            return []
        ends = np.flatnonzero(arr[: L - 1] == arr[L - 1])          # matches end here; continuations start after
        length = np.ones(ends.size, dtype=np.int64)
        alive = ends
        for j in range(1, min(self.max_ngram, L - 1)):             # extend each candidate backwards by one
            alive = alive[alive >= j]
            alive = alive[arr[alive - j] == arr[L - 1 - j]]
            if alive.size == 0:
                break
            length[np.searchsorted(ends, alive)] += 1
        conts: list[list[int]] = []
        seen: set[tuple[int, ...]] = set()
        for n in range(self.max_ngram, self.min_ngram - 1, -1):
            for e in ends[length >= n][::-1][: self.max_matches * 2].tolist():    # most recent first
                c = tuple(arr[e + 1: e + 1 + self.max_depth].tolist())
                if c and c not in seen:
                    seen.add(c)
                    conts.append(list(c))
                    if len(conts) >= self.max_matches:
                        return conts
            if conts:
                break                          # longest n-gram that matched wins
        return conts

    def propose(self, ctx: Context) -> DraftTree:
        with self.overhead:
            return self._propose(ctx)

    def _propose(self, ctx: Context) -> DraftTree:
        dev = ctx.device
        conts = self.continuations(ctx.array())
        if not conts:
            return DraftTree.root_only(ctx.root, device=dev)
        toks, pars = merge_tries(ctx.root, conts)
        tree = DraftTree.from_parents(toks, pars)
        kind = self._kind(tree)                                           # [n] 0 first child, 1 other
        d = tree.depths.numpy()
        est_rate = (self.accepted + self.w * self.prior) / (self.proposed + self.w)
        rate = est_rate[np.minimum(d, self.max_depth), kind]             # P(node accepted), per node
        est = np.ones(tree.size)
        for i in range(1, tree.size):                                     # tiny trees; parents first
            est[i] = min(est[pars[i]], rate[i])
        order = np.argsort(-est[1:], kind="stable") + 1
        if self.cost is not None and self.cost.probe_due():
            return DraftTree.root_only(ctx.root, device=dev)              # a timed one-node pass
        m = (best_prefix(est[order], self.cost, self.max_nodes, self.overhead.ms, len(ctx.tokens)) if self.cost is not None
             else min(len(order), self.max_nodes if self.max_nodes is not None else len(order)))
        keep = np.sort(np.concatenate([[0], order[:m]]))
        keep = keep[d[keep] < max(1, ctx.remaining)]
        if keep.size == 1:
            return DraftTree.root_only(ctx.root, device=dev)
        sub = tree.select(torch.as_tensor(keep))
        sub.template_ids = torch.as_tensor(kind[keep])                    # stays on the CPU
        return sub.to(dev)

    @staticmethod
    def _kind(tree: DraftTree) -> np.ndarray:
        par = tree.parents.numpy()
        kind = np.ones(tree.size, dtype=np.int64)
        first: set[int] = set()
        for i in range(1, tree.size):
            if par[i] not in first:
                first.add(par[i])
                kind[i] = 0
        kind[0] = 0
        return kind

    def observe(self, tree: DraftTree, out, accepted, ctx: Context) -> None:
        self.overhead.commit()           # observe is a few numpy adds: propose is the overhead
        if self.cost is not None and ctx.last_pass is not None:
            self.cost.observe(*ctx.last_pass, context=len(ctx.tokens))
        self.proposed *= self.decay      # old evidence fades: a text that turns repetitive is noticed
        self.accepted *= self.decay
        if tree.template_ids is None:
            return
        d = tree.depths.cpu().numpy()
        kind = tree.template_ids.numpy()
        np.add.at(self.proposed, (d[1:], kind[1:]), 1)
        path = np.asarray(accepted.path[1:], dtype=np.int64)
        if path.size:
            np.add.at(self.accepted, (d[path], kind[path]), 1)

    def describe(self) -> dict:
        return {"method": self.name, "max_ngram": self.max_ngram, "max_depth": self.max_depth,
                "max_matches": self.max_matches, "max_nodes": self.max_nodes,
                "budget": "cost-curve" if self.cost else "fixed"}


def _factory(engine, max_nodes=None, **opts) -> PromptLookup:
    cost = online_cost(engine, max_nodes)
    return PromptLookup(max_nodes=max_nodes, cost=cost, **opts)


def _check(o: dict) -> None:
    if o["min_ngram"] > o["max_ngram"]:
        raise ConfigError(f"method 'lookup' needs min_ngram <= max_ngram, got {o['min_ngram']} > {o['max_ngram']}")


SPEC = MethodSpec(
    "lookup", "prompt lookup (PLD): continuations of earlier occurrences of the newest n-gram", _factory,
    options={
        "max_nodes": MAX_NODES,
        "max_ngram": Option(int, 3, "longest n-gram matched", lo=1, hi=32),
        "min_ngram": Option(int, 1, "shortest n-gram matched", lo=1, hi=32),
        "max_depth": Option(int, 16, "longest continuation drafted", lo=1, hi=64),
        "max_matches": Option(int, 4, "continuations merged into the draft trie", lo=1, hi=64),
        "decay": DECAY,
    },
    check=_check,
    test_opts={"max_depth": 6})
