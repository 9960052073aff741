"""RASD (arXiv 2503.03434): a retrieval trie, pruned by the draft model's distribution, fused
with the model's own draft tree by longest-prefix matching and verified in one pass (method
``rasd``). With ``base: recycling`` it is the train-free fusion: Token Recycling's tree plus
retrieval (prompt lookup and/or a datastore), no draft model.

Terms
- base tree: what the base drafter proposes on its own (draft-model: OPT-Tree by default; or
  Token Recycling), sized by its own budget, with p̂ per node (tree.scores).
- retrieval trie: RetrievalSource's candidates (drafters/retrieval.py) with their own p̂.
- fusion: ``tree.merge_trees(base, retrieval)``: a retrieval path walks the base tree from the
  root while tokens match; the rest hangs under the node where the match ends. Base nodes keep
  their indices, so the base drafter observes its own tree unchanged.
- pruning (ours; the paper leaves the exact rule open): a retrieval node whose parent has a
  known draft distribution (the root, and every node the draft expanded) is scored by that
  distribution: dropped, with its subtree, when the draft gives its token less than ``prune``;
  else p̂ = p̂(parent) x the calibrated acceptance rate of its draft probability (a
  ``Calibration`` of RASD's own, learned from these nodes only: the base drafter's statistics stay
  those of its own nodes, so its tree is what it would draft alone). Deeper retrieval nodes keep
  the retrieval rate. So a branch the
  draft finds implausible never costs a verification row, and one it likes ranks with its own
  nodes.
- growth (ours): the retrieval trie is built first and its p̂ are handed to the base's planner,
  which counts them as already held when it decides whether another draft layer pays; so the
  draft model grows less where retrieval already offers a likely continuation.
- budget: retrieval nodes are added best p̂ first while they raise the expected tokens per ms of
  the whole step (base drafting time included) under the target's cost curve, or up to
  ``retrieval_nodes``.
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch

from draftwise.drafters import draft_model, recycling
from draftwise.drafters.base import Context, Drafter, Proposal
from draftwise.drafters.retrieval import SOURCE_OPTIONS, RetrievalSource, source_from_opts
from draftwise.drafters.spec import MethodSpec, Option
from draftwise.errors import ConfigError
from draftwise.models.layers import ForwardOut
from draftwise.policies.budget import CostCurve, OnlineCost, online_cost
from draftwise.policies.opt_tree import Calibration
from draftwise.tree import DraftTree, merge_trees, tried_nodes

BASES = {"draft-model": draft_model.SPEC, "recycling": recycling.SPEC}   # the base drafters RASD fuses onto


@dataclasses.dataclass
class _Added:
    """The retrieval nodes of the last proposal, in the verified tree's indexing."""
    nodes: torch.Tensor        # [m] node index in the proposed tree
    by_draft: torch.Tensor     # [m] bool: scored by the draft distribution (else by retrieval)
    top1: torch.Tensor         # [m] bool: draft argmax / most-counted child
    p: torch.Tensor            # [m] float64: draft probability / retrieval share
    kind: torch.Tensor         # [m] long: retrieval source kind (retrieval-scored nodes)


class Rasd(Drafter):
    name = "rasd"

    def __init__(self, base: Drafter, source: RetrievalSource, retrieval_nodes: int | None = None,
                 cost: CostCurve | OnlineCost | None = None, prune: float = 0.01):
        if retrieval_nodes is not None and retrieval_nodes < 0:
            raise ConfigError("rasd needs retrieval_nodes >= 0 (or null)")
        if not 0.0 <= prune < 1.0:
            raise ConfigError(f"rasd needs 0 <= prune < 1, got {prune}")
        if retrieval_nodes is None and cost is None:
            raise ConfigError("rasd needs a cost curve unless retrieval_nodes is fixed")
        self.base, self.source, self.retrieval_nodes, self.cost, self.prune = base, source, retrieval_nodes, cost, prune
        self.needs = base.needs
        self.pausable = base.pausable
        self.calib = Calibration()                 # draft probability -> acceptance, for retrieval nodes
        self._a: DraftTree | None = None
        self._added: _Added | None = None
        self._col: torch.Tensor | None = None       # full id -> draft column (vocabulary subset)
        self.last_base_size = 0

    # ------------------------------------------------------------------ drafter API
    def reset(self, ctx: Context) -> None:
        self.base.reset(ctx)
        self.source.reset(ctx)

    def begin(self, ctx: Context, out) -> None:
        self.base.begin(ctx, out)

    def propose(self, ctx: Context) -> DraftTree:
        t0 = time.perf_counter()
        cand = self.source.candidates(ctx)
        # the base grows less where retrieval already offers likely nodes
        self.base.offered(cand.tree.scores[1:].double().numpy() if cand is not None else np.empty(0))
        prop = self.base.propose(ctx)
        if isinstance(prop, Proposal):
            raise ConfigError("rasd fuses plain draft trees; this base drafter returns an early-exit proposal")
        a = prop
        self._a, self._added = a, None
        self.last_base_size = a.size          # nodes [0, last_base_size) of the proposal are the base's
        if cand is None or (self.cost is not None and self.cost.probe_due() and a.size == 1):
            return a
        return self._fuse(ctx, a, cand, t0)

    def _fuse(self, ctx: Context, a: DraftTree, cand, t0: float) -> DraftTree:
        a_cpu = a.to("cpu")
        if a_cpu.scores is None:
            a_cpu.scores = torch.ones(a.size)
        fused, mapping = merge_trees(a_cpu, cand.tree)
        b_par, b_tok = cand.tree.parents.tolist(), cand.tree.tokens.tolist()
        b_rate = cand.tree.scores.double()
        b_rate[1:] = b_rate[1:] / b_rate[cand.tree.parents[1:]].clamp_min(1e-12)     # conditional rates
        score = fused.scores.double().clone()
        dists = self.base.node_dists()
        n = fused.size
        dropped = torch.zeros(n, dtype=torch.bool)
        info: dict[int, tuple[bool, bool, float, int]] = {}      # fused node -> (by_draft, top1, p, kind)
        for i in range(1, cand.tree.size):                       # parents first
            fi, fp = int(mapping[i]), int(mapping[b_par[i]])
            if fi < a.size:
                continue                                         # already a base node
            if dropped[fp]:
                dropped[fi] = True
                continue
            dist = dists.get(fp)
            if dist is not None:
                q, top1 = self._draft_prob(dist, b_tok[i])
                if q < self.prune:
                    dropped[fi] = True
                    continue
                rate = float(self.calib.rate(torch.tensor([top1]), torch.tensor([q], dtype=torch.float64)))
                info[fi] = (True, top1, q, 0)
            else:
                rate = float(b_rate[i])
                info[fi] = (False, bool(cand.top1[i]), float(cand.share[i]), int(cand.kind[i]))
            score[fi] = score[fp] * min(rate, 1.0)
        new = torch.tensor(sorted(info), dtype=torch.long)
        new = new[fused.depths[new] < max(1, ctx.remaining)] if new.numel() else new
        if new.numel() == 0:
            return a
        order = new[torch.sort(-score[new], stable=True).indices]          # best first, parents first on ties
        k = self._how_many(score[order], float(a_cpu.scores[1:].double().sum()), a.size, t0, len(ctx.tokens))
        if k == 0:
            return a
        chosen = torch.sort(order[:k]).values
        keep = torch.cat([torch.arange(a.size), chosen])
        fused.scores = score.float()
        out = fused.select(keep)
        rows = [info[int(c)] for c in chosen]
        self._added = _Added(torch.arange(a.size, a.size + k), torch.tensor([r[0] for r in rows]),
                             torch.tensor([r[1] for r in rows]), torch.tensor([r[2] for r in rows], dtype=torch.float64),
                             torch.tensor([r[3] for r in rows], dtype=torch.long))
        return out.to(ctx.device)

    def _draft_prob(self, dist: torch.Tensor, token: int) -> tuple[float, bool]:
        """(draft probability of a full-vocabulary token, whether it is the draft's argmax)."""
        subset = self.base.subset
        if subset is None:
            col = token if token < dist.numel() else -1
        else:
            if self._col is None:
                self._col = torch.full((subset.vocab_size,), -1, dtype=torch.long)
                self._col[subset.ids.cpu()] = torch.arange(subset.size)
            col = int(self._col[token]) if token < subset.vocab_size else -1
        if col < 0:
            return 0.0, False
        return float(dist[col]), col == int(dist.argmax())

    def _how_many(self, gains: torch.Tensor, e_base: float, base_size: int, t0: float, context: int) -> int:
        cap = gains.numel() if self.retrieval_nodes is None else min(self.retrieval_nodes, gains.numel())
        if self.cost is None:
            return cap
        g = gains[:cap].numpy()
        k = np.arange(g.size + 1)
        spent = (time.perf_counter() - t0) * 1e3
        rate = (1.0 + e_base + np.concatenate([[0.0], np.cumsum(g)])) / (spent + self.cost.t(base_size + k, context))
        return int(np.argmax(rate))

    def observe(self, tree: DraftTree, out, accepted, ctx: Context) -> None:
        a = self._a
        path = accepted.path
        base_path = [n for n in path if n < a.size]               # a prefix: retrieval nodes hang below
        if a.size == tree.size:
            self.base.observe(a, out, accepted, ctx)
        else:
            lh = {k: v[: a.size] for k, v in out.layer_hidden.items()}
            out_a = ForwardOut(out.logits[: a.size] if out.logits is not None else None, out.hidden[: a.size], lh)
            self.base.observe(a, out_a, dataclasses.replace(accepted, path=base_path), ctx)
            if len(base_path) < len(path):          # retrieval nodes accepted below the base's path
                self.base.extended(out, path[len(base_path):], ctx)
        if self._added is not None:
            tried, hit = tried_nodes(tree, path)
            ad = self._added
            t, h = tried[ad.nodes - 1], hit[ad.nodes - 1]
            d = ad.by_draft & t
            if d.any():
                self.calib.update(ad.top1[d], ad.p[d], h[d])
            r = ~ad.by_draft & t
            if r.any():
                self.source.learn(ad.top1[r], ad.p[r], ad.kind[r], h[r])
        self.source.remember(ctx)
        if self.cost is not None and ctx.last_pass is not None:
            self.cost.observe(*ctx.last_pass, context=len(ctx.tokens))
        self._a, self._added = None, None

    def watch(self, tree: DraftTree, out, accepted, ctx: Context) -> None:
        self.base.watch(tree, out, accepted, ctx)

    def lag(self, ctx: Context) -> int:
        return self.base.lag(ctx)

    def describe(self) -> dict:
        s = self.source
        return {"method": self.name, "base": self.base.describe(),
                "datastore": None if s.store is None else str(s.store.path), "lookup": s.lookup is not None,
                "online": s.online, "retrieval_nodes": self.retrieval_nodes, "prune": self.prune}


def _factory(engine, base: str, base_max_nodes, retrieval_nodes, prune: float, datastore, lookup: bool,
             online: bool, max_conts: int, max_len: int) -> Rasd:
    if base == "draft-model" and engine.draft_model is None:
        raise ConfigError("rasd with base draft-model needs a draft model: load one with --draft NAME "
                          "(or use base recycling, the train-free fusion)")
    spec = BASES[base]
    b = spec.factory(engine, **spec.validate({} if base_max_nodes is None else {"max_nodes": base_max_nodes}))
    src = source_from_opts(engine, datastore, lookup, online, max_conts, max_len)
    return Rasd(b, src, retrieval_nodes=retrieval_nodes, cost=online_cost(engine, retrieval_nodes), prune=prune)


SPEC = MethodSpec(
    "rasd", "RASD: retrieval trees pruned by the draft model and fused with its tree (arXiv 2503.03434); "
    "base recycling: the train-free fusion", _factory,
    options={
        "base": Option(str, "draft-model", "the model tree: draft-model (needs --draft) | recycling",
                               choices=tuple(BASES)),
        "base_max_nodes": Option(int, None, "the base drafter's max_nodes (null: its cost-curve budget)",
                                         optional=True, lo=1, hi=256),
        "retrieval_nodes": Option(int, None, "retrieval nodes added per step (null: while they pay under "
                                          "the cost curve)", optional=True, lo=0, hi=256),
        "prune": Option(float, 0.01, "drop a retrieval branch whose token the draft gives less", lo=0.0, hi=1.0),
        **SOURCE_OPTIONS,
    },
    resources_if=lambda o: ("draft_model",) if o.get("base") == "draft-model" else (),
    test_opts=[{"base": "recycling", "base_max_nodes": 6, "retrieval_nodes": 6},
               {"base": "draft-model", "base_max_nodes": 4, "retrieval_nodes": 6, "prune": 0.0},
               {"base": "draft-model", "retrieval_nodes": 4}])
