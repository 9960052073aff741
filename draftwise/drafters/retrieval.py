"""Retrieval drafting: REST (arXiv 2311.08252) over a prebuilt datastore, plus prompt lookup over
the context itself, merged into one trie (method ``retrieval``).

Terms
- continuation: up to max_len tokens that followed an earlier occurrence of the context's
  longest matching suffix (datastore: 16 tokens down to 2, up to 64 occurrences sampled evenly;
  context: prompt lookup's n-grams, 4 down to 2; unigrams, which the lookup method also matches,
  gave ``auto`` no τ on 20 ShareGPT prompts next to Token Recycling and cost a trie every step).
- count: how many continuations pass through a trie node (the two sources weigh the same in
  total when both answer); share = count / parent's count.
- p̂: the product along the path of learned acceptance rates. ``Calibration`` (the one OPT-Tree
  uses) maps (most-counted child or not, share decile) to an acceptance rate, online, one table
  per source kind (datastore only, context only, both agree).
- budget: the nodes of largest p̂ that maximize expected tokens per ms under the target's
  measured cost curve (or a fixed max_nodes).
- online growth (option ``online``): each finished sequence (prompt and answer) joins the
  datastore's in-memory overlay, so later requests draft from earlier answers.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from draftwise.datastore import Datastore
from draftwise.drafters.base import Context, Drafter
from draftwise.drafters.lookup import PromptLookup
from draftwise.drafters.spec import MAX_NODES, MethodSpec, Option
from draftwise.errors import ConfigError
from draftwise.policies.budget import CostCurve, OnlineCost, Overhead, best_prefix, online_cost
from draftwise.policies.opt_tree import Calibration, top_nodes
from draftwise.tree import DraftTree, tried_nodes, two_source_trie

# a node's source kind (one Calibration each): datastore only, context only, both
KIND_STORE, KIND_CONTEXT, KIND_BOTH = 0, 1, 2


@dataclass
class Candidates:
    """A retrieval trie with p̂ per node (tree.scores) and what Calibration needs per node."""
    tree: DraftTree
    top1: torch.Tensor        # [n] bool: the most-counted child of its parent
    share: torch.Tensor       # [n] float64: count / parent's count
    kind: torch.Tensor        # [n] long: KIND_* (store only, context only, both)


class RetrievalSource:
    """Continuations from a datastore and/or the context, as a scored trie."""

    def __init__(self, store: Datastore | None = None, lookup: bool = True, online: bool = False,
                 max_conts: int = 64, max_len: int = 16, max_match: int = 16, store_len: int | None = None):
        if store is None and not lookup and not online:
            raise ConfigError("retrieval needs a datastore, prompt lookup or online growth")
        if max_conts < 1 or max_len < 1 or not 2 <= max_match <= 64 or (store_len is not None and store_len < 1):
            raise ConfigError("retrieval needs max_conts >= 1, max_len >= 1, store_len >= 1 (or null) and "
                              "2 <= max_match <= 64")
        self.store, self.online = store, online
        self.lookup = PromptLookup(max_ngram=4, min_ngram=2, max_depth=max_len, max_matches=8) if lookup else None
        self.max_conts, self.max_len, self.max_match = max_conts, max_len, max_match
        self.store_len = max_len if store_len is None else store_len     # tokens per datastore continuation
        self.calib = [Calibration() for _ in range(3)]          # one per KIND_*
        self.store_ms = 0.0                                     # the datastore's share of the last candidates()
        self._last: list[int] | None = None

    def reset(self, ctx: Context) -> None:
        if self.online and self.store is not None and self._last:
            self.store.add(self._last)            # the previous sequence, prompt and answer
        self._last = None

    def remember(self, ctx: Context) -> None:
        if self.online:
            self._last = ctx.tokens

    def candidates(self, ctx: Context, use_store: bool = True) -> Candidates | None:
        """The scored trie of this step (None: no source has a continuation). use_store: query the datastore
        (when there is one); ``store_ms`` is then its share of this call's time (its search, and of the trie
        the part its tokens make)."""
        t0 = time.perf_counter()
        arr = ctx.array()
        store_conts: list[list[int]] = []
        self.store_ms = 0.0
        if self.store is not None and use_store:
            _, store_conts = self.store.retrieve(arr, self.max_conts, self.store_len, self.max_match)
        t1 = time.perf_counter()
        ctx_conts = self.lookup.continuations(arr) if self.lookup is not None else []
        t2 = time.perf_counter()
        if not store_conts and not ctx_conts:
            self.store_ms = (t1 - t0) * 1e3
            return None
        w_ctx = len(store_conts) / len(ctx_conts) if store_conts and ctx_conts else 1.0
        toks, pars, counts, c_store = two_source_trie(ctx.root, store_conts, ctx_conts, w_ctx)
        n = len(toks)
        # ~n-element lists: plain Python, where torch's per-op cost was most of this step
        share, kind, best = [1.0] * n, [KIND_CONTEXT] * n, {}
        for i in range(1, n):
            p = pars[i]
            share[i] = counts[i] / counts[p]
            j = best.get(p)                                     # most-counted child (first on ties)
            if j is None or counts[i] > counts[j]:
                best[p] = i
            s = c_store[i]
            if s > 0:
                kind[i] = KIND_BOTH if counts[i] - s > 1e-9 else KIND_STORE
        top1 = [False] * n
        top1[0] = True
        for j in best.values():
            top1[j] = True
        kind[0] = KIND_CONTEXT if ctx_conts else KIND_STORE
        calib, p_hat = self.calib, [1.0] * n
        for i in range(1, n):                                   # parents come first
            p_hat[i] = p_hat[pars[i]] * calib[kind[i]].rate_one(top1[i], share[i])
        tree = DraftTree.from_parents(toks, pars, scores=torch.tensor(p_hat, dtype=torch.float32))
        kind_t = torch.tensor(kind)
        tree.origin = (kind_t + 1).to(torch.int8)
        tree.origin[0] = 0
        if store_conts:
            n_store = sum(map(len, store_conts))
            n_all = n_store + sum(map(len, ctx_conts))
            self.store_ms = (t1 - t0 + (time.perf_counter() - t2) * n_store / n_all) * 1e3
        return Candidates(tree, torch.tensor(top1), torch.tensor(share, dtype=torch.float64), kind_t)

    def learn(self, top1: torch.Tensor, share: torch.Tensor, kind: torch.Tensor, accepted: torch.Tensor) -> None:
        for k in range(len(self.calib)):
            sel = kind == k
            if sel.any():
                self.calib[k].update(top1[sel], share[sel], accepted[sel])


class Retrieval(Drafter):
    name = "retrieval"

    def __init__(self, source: RetrievalSource, max_nodes: int | None = None,
                 cost: CostCurve | OnlineCost | None = None):
        if max_nodes is not None and max_nodes < 1:
            raise ConfigError("retrieval needs max_nodes >= 1 (or null)")
        self.source, self.max_nodes, self.cost = source, max_nodes, cost
        self.overhead = Overhead()
        self._kept: Candidates | None = None

    def reset(self, ctx: Context) -> None:
        self.source.reset(ctx)

    def propose(self, ctx: Context) -> DraftTree:
        with self.overhead:
            return self._propose(ctx)

    def _propose(self, ctx: Context) -> DraftTree:
        self._kept = None
        cand = self.source.candidates(ctx)
        if cand is None or (self.cost is not None and self.cost.probe_due()):
            return DraftTree.root_only(ctx.root, device=ctx.device)
        keep = select(cand.tree, self.cost, self.max_nodes, ctx, self.overhead.ms)
        if keep.numel() == 1:
            return DraftTree.root_only(ctx.root, device=ctx.device)
        self._kept = Candidates(cand.tree.select(keep), cand.top1[keep], cand.share[keep], cand.kind[keep])
        return self._kept.tree.to(ctx.device)

    def observe(self, tree: DraftTree, out, accepted, ctx: Context) -> None:
        self.overhead.commit()
        self.source.remember(ctx)
        if self.cost is not None and ctx.last_pass is not None:
            self.cost.observe(*ctx.last_pass, context=len(ctx.tokens))
        if self._kept is not None and tree.size > 1:
            tried, hit = tried_nodes(tree, accepted.path)
            k = self._kept
            self.source.learn(k.top1[1:][tried], k.share[1:][tried], k.kind[1:][tried], hit[tried])
        self._kept = None

    def describe(self) -> dict:
        s = self.source
        return {"method": self.name, "datastore": None if s.store is None else str(s.store.path),
                "lookup": s.lookup is not None, "online": s.online, "max_nodes": self.max_nodes,
                "budget": "cost-curve" if self.cost else "fixed"}


def select(tree: DraftTree, cost, max_nodes: int | None, ctx: Context, overhead_ms: float = 0.0) -> torch.Tensor:
    """Sorted node indices (root first) of the best nodes by p̂ under the cost curve or max_nodes,
    none deeper than the tokens still allowed."""
    s = tree.scores[1:].double()
    gains = torch.sort(s, descending=True).values
    if cost is None:
        m = min(max_nodes if max_nodes is not None else gains.numel(), gains.numel())
    else:
        m = best_prefix(gains, cost, max_nodes, overhead_ms, len(ctx.tokens))
    keep = top_nodes(tree, m)
    return keep[tree.depths[keep].cpu() < max(1, ctx.remaining)]


def load_store(engine, path: str | None, online: bool) -> Datastore | None:
    """The engine's datastore for a path (loaded once per engine and shared by its drafters)."""
    from draftwise.vocab import fingerprint

    cache = engine.shared.setdefault("datastores", {})
    key = (path, online)
    if key not in cache:
        if path:
            cache[key] = Datastore.load(path, fingerprint=fingerprint(engine.tokenizer))
        elif online:
            cache[key] = Datastore.empty(engine.model.cfg.vocab_size)
        else:
            cache[key] = None
    return cache[key]


def source_from_opts(engine, datastore, lookup, online, max_conts, max_len) -> RetrievalSource:
    return RetrievalSource(load_store(engine, datastore, online), lookup=lookup, online=online,
                           max_conts=max_conts, max_len=max_len)


def _factory(engine, max_nodes=None, datastore=None, lookup=True, online=False, max_conts=64, max_len=16) -> Retrieval:
    src = source_from_opts(engine, datastore, lookup, online, max_conts, max_len)
    return Retrieval(src, max_nodes=max_nodes, cost=online_cost(engine, max_nodes))


SOURCE_OPTIONS = {
    "datastore": Option(str, None, "datastore file (draftwise datastore build); null: none", optional=True,
                                 path=True),
    "lookup": Option(bool, True, "also draft continuations found in the context itself (prompt lookup)"),
    "online": Option(bool, False, "add each finished sequence to the datastore's in-memory overlay"),
    "max_conts": Option(int, 64, "continuations retrieved per step", lo=1, hi=1024),
    "max_len": Option(int, 16, "tokens per continuation", lo=1, hi=64),
}

SPEC = MethodSpec(
    "retrieval", "REST datastore retrieval and prompt lookup merged into a trie (arXiv 2311.08252)", _factory,
    options={"max_nodes": MAX_NODES, **SOURCE_OPTIONS},
    test_opts=[{"max_nodes": 8}, {"online": True, "max_nodes": 6}])
