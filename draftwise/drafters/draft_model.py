"""An independent draft model with the target's tokenizer drafts for the target (method
``draft-model``), in one of three shapes:

- ``chain``: k tokens, one draft forward each (SpS; HF assisted generation's shape), greedy or
  sampled from the draft's own warped distribution q (verified with the q-aware rule, so sampled
  output stays exactly the target's).
- ``static``: a fixed tree shape (node = (parent, rank of the parent's draft prediction)), chosen
  once, best first by a prior acceptance per rank; one draft forward per level; deterministic
  top-k children (verified with the deterministic rule).
- ``opt-tree`` (default): OPT-Tree's adaptive tree (policies/opt_tree.py), one draft forward per
  layer over the expanded nodes, final tree = the nodes of largest p̂; deterministic children.

Terms: max_nodes = draft nodes verified per step (null: chosen every step from the cost curves
of both models by ``Planner``: how deep to draft and how many nodes to verify, so that each step
maximizes expected tokens per second of the whole step, draft forwards included);
vocab subset = the draft reads out over the K most frequent tokens only (FR-Spec), verification
stays over the full vocabulary. The draft cache follows the committed sequence (model_base.py).
"""
from __future__ import annotations

import time

import torch

from draftwise.crossvocab import DraftText, VocabBridge
from draftwise.drafters.base import Context
from draftwise.drafters.model_base import ModelDrafter, next_token
from draftwise.drafters.spec import VOCAB_SUBSET, MethodSpec, Option
from draftwise.errors import ConfigError
from draftwise.models.layers import ForwardOut
from draftwise.models.transformer import Transformer
from draftwise.policies.length import CONTROLS, check_name
from draftwise.policies.opt_tree import Calibration, DeltaStop, Planner, TopNStop, grow, top_nodes
from draftwise.tree import DraftTree, make_template, tried_nodes
from draftwise.vocab import VocabSubset, subset_for

SHAPES = ("chain", "static", "opt-tree")
CROSS = ("tli", "string")        # how a draft with another tokenizer drafts (crossvocab.py)
STRING_STOP = 0.3                # string-level drafting stops when the draft's running top-probability product falls below this
# Prior acceptance of the draft's rank-r prediction (ours; it only shapes the static tree).
DRAFT_RANK_PRIOR = (0.7, 0.15, 0.05, 0.03, 0.02, 0.01, 0.01, 0.01)
STATIC_NODES = 6          # the static tree's size when max_nodes is null (sized for a CPU target)


class DraftModel(ModelDrafter):
    name = "draft-model"

    def __init__(self, net: Transformer, tree: str = "opt-tree", max_nodes: int | None = None, max_depth: int = 10,
                 width: int = 8, delta: float | None = None, subset: VocabSubset | None = None,
                 planner: Planner | None = None, calibrate: bool = True, max_len: int | None = None,
                 control=None, window: int | None = None, bridge: VocabBridge | None = None, cross: str = "tli"):
        if tree not in SHAPES:
            raise ConfigError(f"draft-model tree must be one of {', '.join(SHAPES)}, got {tree!r}")
        if max_depth < 1 or width < 1 or (max_nodes is not None and max_nodes < 1):
            raise ConfigError("draft-model needs max_depth >= 1, width >= 1 and max_nodes >= 1 (or null)")
        if delta is not None and delta < 0:
            raise ConfigError(f"draft-model needs delta >= 0 (or null), got {delta}")
        if control is not None and tree != "chain":
            raise ConfigError(f"draft-model length control needs tree 'chain', got {tree!r}")
        string = bridge is not None and cross == "string"
        if planner is None and max_nodes is None and tree != "static" and control is None and not string:
            raise ConfigError("draft-model needs cost curves (a planner) unless max_nodes is fixed")
        extra = max(width, max_nodes or 0) * max_depth + 1
        if window is not None and window < 1:
            raise ConfigError(f"draft-model needs window >= 1 (or null), got {window}")
        if cross not in CROSS:
            raise ConfigError(f"draft-model cross must be one of {', '.join(CROSS)}, got {cross!r}")
        self.string = string
        if self.string and tree != "chain":
            raise ConfigError(f"draft-model cross 'string' drafts chains: needs tree 'chain', got {tree!r}")
        super().__init__(net.new_cache((max_len or net.max_len) + extra), window=window,
                         text=None if bridge is None else DraftText(bridge))
        self.max_pos = net.max_len
        self.vocab_size = net.cfg.vocab_size if bridge is None else bridge.t.rows     # the target's
        rows = None if subset is None else subset.ids            # the draft's head rows, when not all
        if bridge is not None:
            if self.string:
                subset = rows = None                             # the draft's own full distribution
            else:                                                # TLI: shared tokens only, in target ids
                ids = bridge.shared if subset is None else subset.ids[bridge.t2d[subset.ids.cpu()] >= 0]
                if ids.numel() == 0:
                    raise ConfigError("draft-model: the vocabulary subset and the shared vocabulary do not meet")
                subset = VocabSubset(ids.cpu(), bridge.t.rows)
                rows = bridge.t2d[subset.ids]
        self.net, self.shape, self.max_nodes, self.max_depth = net, tree, max_nodes, max_depth
        self.width, self.delta, self.planner = width, delta, planner
        self.control = control               # a chain length control (policies/length.py) or None
        self._tops: list[float] = []
        self._t0 = self._draft_ms = 0.0
        self._k = 0                          # the chain length planned for this step (with a control)
        self.subset = None if subset is None else subset.to(net.device)
        self._ids_cpu = None if subset is None else subset.ids.cpu()       # for sampled drafts (q on the CPU)
        self.head = net.lm_head if rows is None else net.lm_head.rows(rows.to(net.device))
        self.calib = Calibration() if calibrate else None
        self.g: torch.Generator | None = None
        self._info: tuple[torch.Tensor, torch.Tensor] | None = None     # (top1, p) of the proposed nodes
        self.dists: dict[int, torch.Tensor] = {}     # node of the proposed tree -> draft distribution [K] after it
        if tree == "static":
            n = max_nodes or STATIC_NODES
            self.t_par, self.t_rank, _ = make_template(n + 1, len(DRAFT_RANK_PRIOR), max_depth, DRAFT_RANK_PRIOR)
            depths = torch.zeros_like(self.t_par)
            for i in range(1, self.t_par.numel()):
                depths[i] = depths[self.t_par[i]] + 1
            self.t_depth = depths

    # ------------------------------------------------------------------ network
    def reset(self, ctx: Context) -> None:
        super().reset(ctx)
        s = ctx.sampling
        self.g = None if s.greedy else torch.Generator("cpu").manual_seed(
            (s.seed if s.seed is not None else torch.seed()) + 0x5EED)

    def forward_draft(self, tokens, positions, mask, ctx, catch_up: bool) -> ForwardOut:
        t0 = time.perf_counter()
        out = self.net.forward(tokens, positions, self.cache, tree_mask=mask, compute_logits=False)
        out.logits = self.head(out.hidden[-1:] if catch_up else out.hidden)   # [1 or n, K or V]
        if self.planner is not None and not catch_up:
            if out.logits.device.type == "cuda":
                torch.cuda.synchronize(out.logits.device)
            self.planner.draft_cost.observe(tokens.numel(), (time.perf_counter() - t0) * 1e3,
                                            context=len(ctx.tokens))
        return out

    def chain_length(self, ctx: Context) -> int:
        """Extension point: how many tokens a chain with a length control drafts this step, decided
        before any draft forward (a subclass may first show the control what it reads: EAGLE's LDLP)."""
        return min(self.max_depth, max(0, ctx.remaining - 1), self.control.plan(len(ctx.tokens)))

    def propose(self, ctx: Context):
        self._t0 = time.perf_counter()
        if self.control is not None:
            self._k = self.chain_length(ctx)
            if self._k == 0:                           # a plain step: no draft forward at all
                self._tops, self._info, self.dists = [], None, {}
                self._draft_ms = (time.perf_counter() - self._t0) * 1e3
                return DraftTree.root_only(ctx.root, device=ctx.device)
        if self.planner is not None and not self.planner.drafting_can_pay(len(ctx.tokens)):
            self._tops, self._info, self.dists = [], None, {}       # no catch-up either: plain steps only
            self._draft_ms = (time.perf_counter() - self._t0) * 1e3
            return DraftTree.root_only(ctx.root, device=ctx.device)
        if self.planner is not None:
            self.planner.begin(len(ctx.tokens))          # the catch-up counts as spent
        tree = super().propose(ctx)
        self._draft_ms = (time.perf_counter() - self._t0) * 1e3
        return tree

    def offered(self, scores) -> None:
        if self.planner is not None:
            self.planner.extra = scores

    def node_dists(self) -> dict[int, torch.Tensor]:
        return self.dists

    def _probs(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.float().softmax(-1)

    def _rate(self, top1: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        return p if self.calib is None else self.calib.rate(top1, p)

    # ------------------------------------------------------------------ shapes
    def draft(self, ctx: Context, first) -> DraftTree:
        depth = min(self.max_depth, max(0, ctx.remaining - 1))
        # string-level drafts read out over the draft's own vocabulary: no distribution over target ids to offer
        self.dists = {} if self.string else {0: self._probs(first.logits[-1]).double().cpu()}
        if depth == 0:
            return DraftTree.root_only(ctx.root, device=ctx.device)
        if self.string:
            return self._string(ctx, first, depth)
        shape = {"chain": self._chain, "static": self._static, "opt-tree": self._opt_tree}[self.shape]
        return shape(ctx, first, depth)

    def _next(self, logits: torch.Tensor, ctx: Context) -> tuple[int, float, torch.Tensor | None]:
        return next_token(logits, ctx.sampling, self.g, self._ids_cpu, self.vocab_size)

    def _chain(self, ctx: Context, first, depth: int) -> DraftTree:
        k = depth if self.max_nodes is None else min(depth, self.max_nodes)
        ctl = self.control
        if ctl is not None:
            k = min(depth, self._k)                      # planned in propose
        tokens, qs, tops, scores = [], [], [], [1.0]
        logits = first.logits[-1]
        for d in range(k):
            tok, top, q = self._next(logits, ctx)
            if ctl is not None and not ctl.more(d, top):
                break
            tokens.append(tok); qs.append(q); tops.append(top)
            r = float(self._rate(torch.tensor([True]), torch.tensor([top], dtype=torch.float64)))
            scores.append(scores[-1] * r)
            if self.planner is not None:
                self.planner.learn(r)
            if d + 1 == k:
                break
            if self.max_nodes is None and ctl is None:
                s = torch.tensor(scores, dtype=torch.float64)
                if self.planner.expand(s, s[-1:], k - d - 1) == 0:
                    break
            tree = DraftTree.chain(ctx.root, tokens, device=self.cache.k.device)
            logits = self.step(tree, [d + 1], ctx).logits[-1]
        if self.max_nodes is None and self.g is None and ctl is None:
            # greedy only: cutting a sampled chain by later scores would make a draw's survival
            # depend on its own value
            m = self.planner.size(torch.tensor(scores[1:]).numpy())
            tokens, tops = tokens[:m], tops[:m]
        self._tops = tops[: len(tokens)]
        tree = DraftTree.chain(ctx.root, tokens, device=ctx.device, q=qs)
        tree.scores = torch.tensor(scores[: len(tokens) + 1], dtype=torch.float32, device=ctx.device)
        self._info = (torch.ones(len(tokens), dtype=torch.bool), torch.tensor(tops, dtype=torch.float64))
        return tree

    def _string(self, ctx: Context, first, depth: int) -> DraftTree:
        """String-level drafting: the draft continues greedily in its own vocabulary while its running
        top-probability product stays above STRING_STOP and the planner finds one more draft token
        worth its time, for at most max_depth tokens; the continuation's text, re-encoded by the
        target's tokenizer, is the chain. Its tokens carry no
        q: the target checks them with the deterministic rule (exact for sampling too: the target
        samples each token itself and the draft's is kept while they agree; a greedy continuation is
        kept with probability p(argmax q), at least the sum of q(x) p(x) a sampled one would get
        wherever both models rank the same token first). Its pending rows are dropped; the next
        catch-up feeds what was accepted."""
        bridge = self.text.bridge
        ids, run, runs = [], 1.0, []
        logits = first.logits[-1]
        k = depth if self.max_nodes is None else min(depth, self.max_nodes)
        for d in range(self.max_depth):
            tok, top, _ = next_token(logits, ctx.sampling, None, None, self.net.cfg.vocab_size)     # greedy
            run *= top
            ids.append(tok)
            runs.append(run)
            if run < STRING_STOP or bridge.d.special[tok] or d + 1 == self.max_depth:
                break
            if self.planner is not None:                 # both models' cost curves: does one more draft token pay?
                self.planner.learn(top)
                sc = torch.tensor([1.0] + runs, dtype=torch.float64)
                if self.planner.expand(sc, sc[-1:], self.max_depth - d - 1) == 0:
                    break
            chain = DraftTree.chain(ctx.root, ids, device=self.cache.k.device)
            logits = self.step(chain, [d + 1], ctx, draft_ids=True).logits[-1]
        self.cache.discard()
        self.fed, self.fed_ids = [], []
        tokens = bridge.to_target(ids)[:k]
        tree = DraftTree.chain(ctx.root, tokens, device=ctx.device)
        # a target token's score: the running product at the draft token where its text ends
        ends, at = [], 0
        for j in ids:
            at += len(bridge.d.raw[j])
            ends.append(at)
        scores, at, r = [1.0], 0, 0
        for t in tokens:
            at += len(bridge.t.raw[t])
            while r + 1 < len(ends) and ends[r] < at:
                r += 1
            scores.append(runs[r])
        tree.scores = torch.tensor(scores, dtype=torch.float32, device=ctx.device)
        self._info = None
        return tree

    def _static(self, ctx: Context, first, depth: int) -> DraftTree:
        keep = torch.nonzero(self.t_depth <= depth).flatten()
        par, rank, dep = self.t_par[keep], self.t_rank[keep], self.t_depth[keep]
        n = keep.numel()
        tokens, top1 = [ctx.root] + [0] * (n - 1), torch.ones(n, dtype=torch.bool)
        p = torch.ones(n, dtype=torch.float64)
        probs = {0: self._probs(first.logits[-1]).double().cpu()}            # node -> its children's distribution
        for d in range(1, int(dep.max()) + 1):
            level = torch.nonzero(dep == d).flatten().tolist()
            for i in level:
                pr = probs[int(par[i])]
                order = torch.topk(pr, int(rank[i]) + 1).indices
                j = int(order[-1])
                tokens[i] = j if self._ids_cpu is None else int(self._ids_cpu[j])
                top1[i], p[i] = int(rank[i]) == 0, pr[j]
            parents_next = [i for i in level if bool((par == i).any())]
            if parents_next:
                tree = DraftTree.from_parents(tokens[: max(level) + 1], par[: max(level) + 1].tolist())
                out = self._probs(self.step(tree, parents_next, ctx).logits).double().cpu()
                probs.update({i: out[r] for r, i in enumerate(parents_next)})
        self._info = (top1[1:], p[1:])
        rate = torch.ones(n, dtype=torch.float64)
        rate[1:] = self._rate(top1[1:], p[1:])
        for i in range(1, n):                                                # p̂, parents first
            rate[i] *= rate[int(par[i])]
        return DraftTree.from_parents(tokens, par.tolist(), scores=rate.float(), device=ctx.device)

    def _opt_tree(self, ctx: Context, first, depth: int) -> DraftTree:
        ids = None if self.subset is None else self.subset.ids
        if self.delta is not None:
            stop = DeltaStop(self.delta, self.width)
        elif self.max_nodes is not None:
            stop = TopNStop(self.max_nodes)
        else:
            stop = self.planner

        grown: dict[int, torch.Tensor] = {}

        def layer(tree: DraftTree, nodes: list[int]) -> torch.Tensor:
            probs = self._probs(self.step(tree, nodes, ctx).logits)
            grown.update(zip(nodes, probs.double().cpu()))
            return probs

        if stop is not self.planner:
            stop.begin(len(ctx.tokens))
        width = max(self.width, self.max_nodes or 0)          # a fixed budget n keeps n candidates per layer
        tree, top1, p = grow(ctx.root, self._probs(first.logits[-1:]), layer, width, depth, stop, ids, self.calib)
        p_hat = torch.sort(tree.scores[1:].double(), descending=True).values
        if self.max_nodes is not None:
            m = min(self.max_nodes, p_hat.numel())
        else:
            m = self.planner.size(p_hat.numpy())
        keep = top_nodes(tree, m)
        self._info = (top1[keep[1:]], p[keep[1:]])
        self.dists.update({j: grown[int(i)] for j, i in enumerate(keep.tolist()) if int(i) in grown})
        return self.select(tree, keep).to(ctx.device)          # renumbers the pending rows too

    # ------------------------------------------------------------------ feedback
    def observe(self, tree, out, accepted, ctx) -> None:
        if self.control is not None:
            costs = self.control.costs
            if costs is not None:
                costs.observe_draft(tree.size - 1, self._draft_ms)     # k tokens: k draft forwards
                if ctx.last_pass is not None:
                    costs.verify.observe(*ctx.last_pass, context=len(ctx.tokens))
            self.control.update(self._tops if tree.size > 1 else [], len(accepted.path) - 1)
            self._tops = []
        super().observe(tree, out, accepted, ctx)
        self.learn(tree, accepted.path)
        if self.planner is not None and ctx.last_pass is not None:
            self.planner.target_cost.observe(*ctx.last_pass, context=len(ctx.tokens))

    def learn(self, tree: DraftTree, path: list[int]) -> None:
        """Update the calibration from the verdict on the proposed tree (path: accepted nodes, root first)."""
        if self.calib is not None and self._info is not None and tree.size > 1:
            tried, hit = tried_nodes(tree, path)
            n = min(tree.size - 1, self._info[0].numel())
            t = tried[:n]
            self.calib.update(self._info[0][:n][t], self._info[1][:n][t], hit[:n][t])
        self._info = None

    def describe(self) -> dict:
        return {"method": self.name, "tree": self.shape, "max_nodes": self.max_nodes, "max_depth": self.max_depth,
                "width": self.width, "delta": self.delta,
                "vocab_subset": None if self.subset is None else self.subset.size}


def _factory(engine, tree: str, max_nodes, max_depth: int, width: int, delta, vocab_subset: int,
             calibrate: bool, length, window, cross) -> DraftModel:
    from draftwise.policies.budget import OnlineCost
    from draftwise.policies.length import StepCosts, parse_control

    ctl = None
    if length is not None:
        costs = None
        if not length.startswith("fixed:"):
            t_d = float(engine.draft_cost_curve().t(1))
            costs = StepCosts(OnlineCost(engine.cost_curve()), draft_ms=t_d, plain_ms=t_d)
        ctl = parse_control(length, costs, max_depth)
    need_plan = max_nodes is None and tree != "static" and ctl is None
    planner = Planner(OnlineCost(engine.cost_curve()), OnlineCost(engine.draft_cost_curve())) if need_plan else None
    bridge = engine.draft_bridge
    sub = subset_for(engine, vocab_subset, engine.model.cfg.vocab_size if bridge is not None
                     else engine.draft_model.cfg.vocab_size)
    return DraftModel(engine.draft_model, tree=tree, max_nodes=max_nodes, max_depth=max_depth, width=width,
                      delta=delta, subset=sub, planner=planner, calibrate=calibrate, max_len=engine.model.max_len,
                      control=ctl, window=window, bridge=bridge, cross=cross)


def _check(o: dict) -> None:
    check_name(o["length"], CONTROLS, "draft-model option 'length'", o["max_depth"])
    if o["cross"] == "string" and (o["tree"] != "chain" or o["length"] is not None):
        raise ConfigError("draft-model option cross 'string' drafts plain chains: needs tree 'chain' and no 'length'")
    if o["length"] is not None and o["tree"] != "chain":
        raise ConfigError(f"draft-model option 'length' needs tree 'chain', got {o['tree']!r}")


SPEC = MethodSpec(
    "draft-model", "a smaller model drafts a chain, a static tree or an OPT-Tree (arXiv 2406.17276); a draft "
    "with another tokenizer drafts over the shared vocabulary (TLI) or by text (cross string; arXiv 2502.05202)",
    _factory, resources=("draft_model",),
    options={
        "tree": Option(str, "opt-tree", "draft shape: chain | static | opt-tree",
                               choices=SHAPES),
        "max_nodes": Option(int, None, "draft nodes verified per step (null: chosen each step from both "
                                    f"models' cost curves; static: {STATIC_NODES})", optional=True, lo=1, hi=256),
        "max_depth": Option(int, 10, "deepest draft layer (chain: most tokens)", lo=1, hi=32),
        "width": Option(int, 8, "opt-tree: candidates kept per layer (paper: 50-60 on a GPU)", lo=1, hi=64),
        "delta": Option(float, None, "opt-tree: the paper's stop rule, grow while a layer raises E by more "
                                "(null: decided from both cost curves)", optional=True, lo=0.0, hi=64.0),
        "vocab_subset": VOCAB_SUBSET,
        "calibrate": Option(bool, True, "score nodes by learned acceptance rates instead of raw draft "
                                    "probabilities"),
        "length": Option(str, None, "chain only: length control fixed:K | beta-ts | calibration-ts "
                                  "(null: the cost-curve planner)", optional=True),
        "window": Option(int, 256, "most context tokens the draft model's prefill reads (null: all); a "
                                   "long prompt's full prefill on the draft costs more than it saves",
                         optional=True, lo=1, hi=1 << 20),
        "cross": Option(str, "tli", "a draft with another tokenizer: tli (drafts over the tokens both vocabularies "
                                    "share) | string (its text re-encoded by the target's tokenizer; chains)",
                        choices=CROSS),
    },
    check=lambda o: _check(o),
    renamed={"control": "length"},
    test_opts=[{"tree": "chain", "max_nodes": 3, "vocab_subset": 0},
               {"tree": "chain", "window": 8, "vocab_subset": 0},
               {"tree": "chain", "vocab_subset": 0},
               {"tree": "chain", "length": "beta-ts", "max_depth": 5, "vocab_subset": 0},
               {"tree": "chain", "length": "calibration-ts", "max_depth": 5, "vocab_subset": 0},
               {"tree": "static", "max_nodes": 5, "vocab_subset": 0},
               {"tree": "opt-tree", "width": 4, "max_depth": 4, "vocab_subset": 0},
               {"tree": "opt-tree", "width": 4, "max_depth": 4, "delta": 0.05, "max_nodes": 6, "vocab_subset": 0}])
