"""Token Recycling (arXiv 2408.08696): train-free drafting from the target's own past top-k.

State: an adjacency matrix M [V, k] holding, for each token, the top-k next tokens the target
last predicted after it. A fixed tree template (node = (parent, rank)) is expanded breadth-first
with one gather per level: token[node] = M[token[parent], rank]. After every target pass, every
scored node refreshes its row: M[token[node]] = topk(logits[node], k). M persists across
prompts (hot start) and can be saved and loaded.

Budget (ours): each template node keeps an online estimate of its acceptance probability;
each step keeps the best nodes (parents first) that maximize expected tokens per second under
the measured cost curve t(n) (see policies/budget.py). The paper's static 80-node template is
far too large for a CPU; here the tree shrinks or grows to what the hardware pays for.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from draftwise import kernels
from draftwise.drafters.base import Context, Drafter
from draftwise.drafters.spec import DECAY, MAX_NODES, MethodSpec, Option
from draftwise.errors import CheckpointError, ConfigError
from draftwise.policies.budget import CostCurve, OnlineCost, Overhead, best_prefix, online_cost
from draftwise.tree import DraftTree, make_template

# Prior probability that the target's top-r prediction (r = 0..7) is the next token (ours; it
# only seeds the online estimates).
RANK_PRIOR = (0.55, 0.12, 0.05, 0.03, 0.02, 0.015, 0.01, 0.008)


class TokenRecycling(Drafter):
    name = "recycling"

    def __init__(self, vocab_size: int, k: int = 8, template_nodes: int = 80, max_nodes: int | None = None,
                 cost: CostCurve | OnlineCost | None = None, prior_weight: float = 4.0, decay: float = 0.98, device="cpu"):
        if k < 1 or template_nodes < 1:
            raise ConfigError("recycling needs k >= 1 and template_nodes >= 1")
        if max_nodes is not None and max_nodes < 0:
            raise ConfigError("max_nodes must be >= 0")
        self.vocab_size, self.k, self.device = vocab_size, k, torch.device(device)
        self.M = torch.zeros(vocab_size, k, dtype=torch.long, device=self.device)   # [V, k]
        self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=self.device)     # [V] row filled
        cpu = self.device.type == "cpu"
        self._M_np, self._seen_np = (self.M.numpy(), self.seen.numpy()) if cpu else (None, None)   # views
        self.parents, self.ranks, self.prior = make_template(template_nodes + 1, k, 6, RANK_PRIOR)
        self.depths = torch.zeros_like(self.parents)
        for i in range(1, self.parents.numel()):
            self.depths[i] = self.depths[self.parents[i]] + 1
        self.levels_cpu = [torch.nonzero(self.depths == d).flatten() for d in range(1, int(self.depths.max()) + 1)]
        self.levels = [lv.to(self.device) for lv in self.levels_cpu]
        self.max_nodes = max_nodes
        self.cost = cost
        self.w = prior_weight
        self.decay = decay      # old evidence fades, so a rejected node is retried after a while
        self.proposed = torch.zeros(self.parents.numel())
        self.accepted = torch.zeros(self.parents.numel())
        self._par_dev = self.parents.to(self.device)
        self._rank_dev = self.ranks.to(self.device)
        self._depths_dev = self.depths.to(self.device)
        self._prior_np, self._parents_np, self._depths_np = self.prior.numpy(), self.parents.numpy(), self.depths.numpy()
        self._levels_np = [lv.numpy() for lv in self.levels_cpu]
        self._ranks_np = self.ranks.numpy()
        self._par_list, self._rank_list = self.parents.tolist(), self.ranks.tolist()
        self._est: np.ndarray | None = None            # estimates, until record() or load() changes them
        self._est_order: list[int] | None = None        # template nodes 1..T-1 by estimate, best first (lazy)
        self.last_size = 0
        self.overhead = Overhead()

    # ---------------------------------------------------------------- budget
    def estimates(self) -> torch.Tensor:
        """[T] acceptance probability estimate per template node (never above its parent's)."""
        return torch.from_numpy(self._estimates().copy())

    def _estimates(self) -> np.ndarray:
        if self._est is None:       # numpy views of the CPU statistics: ~80 elements, where torch's per-op cost dominated
            est = (self.accepted.numpy() + self.w * self._prior_np) / (self.proposed.numpy() + self.w)
            est[0] = 1.0
            for lv in self._levels_np:
                est[lv] = np.minimum(est[lv], est[self._parents_np[lv]])
            self._est, self._est_order = est, None
        return self._est

    def choose_nodes(self, est: torch.Tensor, remaining: int, context: int | None = None) -> torch.Tensor:
        """Template node ids to draft (sorted, parents first, root included)."""
        order = torch.sort(-est[1:], stable=True).indices + 1          # best first, parents first on ties
        order = order[est[order] > 0]
        if self.cost is None:
            m = min(self.max_nodes if self.max_nodes is not None else order.numel(), order.numel())
        elif self.cost.probe_due():
            m = 0                                                          # a timed one-node pass
        else:
            m = best_prefix(est[order], self.cost, max_nodes=self.max_nodes, overhead_ms=self.overhead.ms,
                            context=context)
        keep = torch.cat([torch.zeros(1, dtype=torch.long), order[:m]])
        # a node deeper than the tokens still allowed is wasted work
        keep = keep[self.depths[keep] < max(1, remaining)]
        return torch.sort(keep).values

    # ---------------------------------------------------------------- drafter API
    def propose(self, ctx: Context) -> DraftTree:
        with self.overhead:
            return self._propose(ctx)

    def _propose(self, ctx: Context) -> DraftTree:
        full = self.candidates(ctx)
        keep = self.choose_nodes(full.scores.cpu().double(), ctx.remaining, len(ctx.tokens))
        self.last_size = keep.numel()
        if keep.numel() == 1:
            return DraftTree.root_only(ctx.root, device=self.device)
        return full.select(keep.to(self.device))

    def candidates(self, ctx: Context) -> DraftTree:
        """Every template node as a tree (parents first): tokens from the matrix, ``scores`` the
        acceptance estimates (0 where a parent's row was never filled), ``template_ids`` the template
        node of each tree node. What a fusion of sources reads (``auto``); ``propose`` keeps a prefix."""
        if self.device.type == "cpu":
            t, est = self.candidate_arrays(ctx)
            tree = DraftTree(torch.from_numpy(t), self._par_dev, self._depths_dev)
            tree.scores = torch.from_numpy(est).float()
            tree.template_ids = torch.arange(self.parents.numel())
            return tree
        toks = torch.empty(self.parents.numel(), dtype=torch.long, device=self.device)
        valid = torch.ones(self.parents.numel(), dtype=torch.bool, device=self.device)
        toks[0] = ctx.root
        for lvl in self.levels:                                          # one gather per level
            ptok = toks[self._par_dev[lvl]]
            toks[lvl] = self.M[ptok, self._rank_dev[lvl]]
            valid[lvl] = valid[self._par_dev[lvl]] & self.seen[ptok]
        est = self.estimates() * valid.cpu()
        tree = DraftTree(toks, self._par_dev, self._depths_dev)
        tree.scores = est.float().to(self.device)
        tree.template_ids = torch.arange(self.parents.numel())
        return tree

    def candidate_arrays(self, ctx: Context) -> tuple[np.ndarray, np.ndarray]:
        """candidates() as numpy arrays, CPU matrix only: (tokens [T] int64, scores [T] float64), template
        node i at index i. numpy: ~80-element arrays, where torch's per-op cost was most of the step's
        bookkeeping."""
        M, seen, par = self._M_np, self._seen_np, self._parents_np
        t = np.empty(par.size, dtype=np.int64)
        ok = np.ones(par.size, dtype=bool)
        t[0] = ctx.root
        for lvl in self._levels_np:                                      # one gather per level
            ptok = t[par[lvl]]
            t[lvl] = M[ptok, self._ranks_np[lvl]]
            ok[lvl] = ok[par[lvl]] & seen[ptok]                          # never draft from an empty row
        return t, self._estimates() * ok

    def best_candidates(self, ctx: Context, k: int) -> tuple[list[int], list[int], list[int], list[float]]:
        """The root and the k template nodes of highest estimate, CPU matrix, as lists (parents first): template
        ids, tokens, parents (positions in these lists; -1 for the root) and estimates. A node's estimate never
        exceeds its parent's and ties keep the parent first, so the k best are closed under parents; a node whose
        parent's matrix row was never filled is left out with its subtree. Plain Python over ~k nodes: what a
        fusion of sources reads each step (``auto``), where numpy's per-call cost was most of the step."""
        est = self._estimates()
        if self._est_order is None:                 # only auto reads the order: sorted once per record
            self._est_order = (np.argsort(-est[1:], kind="stable") + 1).tolist()
        M, seen, par, rank = self._M_np, self._seen_np, self._par_list, self._rank_list
        pos = {0: 0}
        ids, toks, pars, scores = [0], [int(ctx.root)], [-1], [1.0]
        for i in sorted(self._est_order[:k]):
            p = pos.get(par[i])
            if p is None or not seen[toks[p]]:
                continue
            pos[i] = len(ids)
            ids.append(i)
            toks.append(int(M[toks[p], rank[i]]))
            pars.append(p)
            scores.append(float(est[i]))
        return ids, toks, pars, scores

    @property
    def template_size(self) -> int:
        return len(self._par_list)

    def observe(self, tree: DraftTree, out, accepted, ctx: Context) -> None:
        with self.overhead:
            self.learn_rows(tree.tokens, out.logits)
            if tree.template_ids is not None:
                on_path = torch.zeros(tree.size, dtype=torch.bool)
                on_path[torch.tensor(accepted.path)] = True
                self.record(tree.template_ids, on_path)
        self.overhead.commit()
        if self.cost is not None and ctx.last_pass is not None:
            self.cost.observe(*ctx.last_pass, context=len(ctx.tokens))

    def watch(self, tree: DraftTree, out, accepted, ctx: Context) -> None:
        self.learn_rows(tree.tokens, out.logits)

    def learn_rows(self, tokens: torch.Tensor, logits: torch.Tensor) -> None:
        """M[token] = the target's top-k after each verified node (any node of any source teaches it).
        tokens [n], logits [n, V]."""
        top = kernels.topk_rows(logits, self.k)                        # [n, k] (torch.topk's indices)
        rows = tokens.to(self.M.device)
        self.M[rows] = top.to(self.M.device)
        self.seen[rows] = True

    def record(self, template_ids: torch.Tensor, accepted: torch.Tensor) -> None:
        """Acceptance statistics of drafted template nodes ([m] ids, [m] bool accepted); old evidence fades."""
        self.proposed *= self.decay
        self.accepted *= self.decay
        self.proposed[template_ids] += 1
        self.accepted[template_ids[accepted]] += 1
        self._est = None

    def record_lists(self, template_ids: list[int], accepted: list[bool]) -> None:
        """record() for lists (distinct ids), on the statistics' numpy views: a few calls instead of torch's
        per-op cost."""
        p, a = self.proposed.numpy(), self.accepted.numpy()
        p *= self.decay
        a *= self.decay
        p[template_ids] += 1
        a[[i for i, hit in zip(template_ids, accepted) if hit]] += 1
        self._est = None

    def describe(self) -> dict:
        return {"method": self.name, "k": self.k, "template_nodes": self.parents.numel() - 1,
                "max_nodes": self.max_nodes, "budget": "cost-curve" if self.cost else "fixed"}

    # ---------------------------------------------------------------- persistence
    def save(self, path: str | Path) -> None:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        torch.save({"format": "draftwise-recycling-v1", "M": self.M.cpu(), "k": self.k,
                    "vocab_size": self.vocab_size, "seen": self.seen.cpu(), "proposed": self.proposed, "accepted": self.accepted}, tmp)
        tmp.replace(path)

    def load(self, path: str | Path) -> None:
        try:
            d = torch.load(Path(path), map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise CheckpointError(f"recycling matrix {path} not found") from None
        except Exception as e:  # noqa: BLE001 - torch.load raises many types for corrupt files
            raise CheckpointError(f"recycling matrix {path} is corrupt: {type(e).__name__}") from None
        if not isinstance(d, dict) or d.get("format") != "draftwise-recycling-v1":
            raise CheckpointError(f"{path} is not a draftwise recycling matrix")
        if d["vocab_size"] != self.vocab_size or d["k"] != self.k:
            raise CheckpointError(f"recycling matrix {path} is for vocab {d['vocab_size']} / k {d['k']}, "
                                  f"this model needs vocab {self.vocab_size} / k {self.k}")
        self.M.copy_(d["M"])
        self.seen.copy_(d["seen"])
        if d["proposed"].shape == self.proposed.shape:
            self.proposed.copy_(d["proposed"]); self.accepted.copy_(d["accepted"])
        self._est = None


def _factory(engine, max_nodes=None, **opts) -> TokenRecycling:
    cost = online_cost(engine, max_nodes)
    return TokenRecycling(engine.model.cfg.vocab_size, max_nodes=max_nodes, cost=cost, device=engine.model.device, **opts)


SPEC = MethodSpec(
    "recycling", "Token Recycling: train-free tree from the target's own past top-k (arXiv 2408.08696)", _factory,
    options={
        "max_nodes": MAX_NODES,
        "k": Option(int, 8, "next-token candidates kept per token in the adjacency matrix (the rank prior covers 8)",
                            lo=1, hi=len(RANK_PRIOR)),
        "template_nodes": Option(int, 80, "nodes of the tree template the budget chooses from", lo=1, hi=512),
        "decay": DECAY,
    },
    test_opts={"max_nodes": 12})
