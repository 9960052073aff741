"""An independent draft model with the target's tokenizer drafts a chain (SpS; HF assisted
generation's shape): k tokens, one draft forward each, greedy or sampled from the draft's own
(warped) distribution q, so sampled output stays exactly the target's.

Terms: k = most tokens drafted per step; min_prob = stop drafting once the draft's top probability
falls below it (0 = always draft k); vocab subset = the draft reads out over
the K most frequent tokens only (FR-Spec), verification stays over the full vocabulary.
Tree shapes and OPT-Tree build on this file (issue: draft model + OPT-Tree).
"""
from __future__ import annotations

import torch

from draftwise import methods
from draftwise.drafters.base import Context
from draftwise.drafters.model_base import ModelDrafter
from draftwise.errors import ConfigError
from draftwise.models.transformer import ForwardOut, Transformer
from draftwise.sampling import warp
from draftwise.tree import DraftTree
from draftwise.vocab import VocabSubset


class DraftModel(ModelDrafter):
    name = "draft"

    def __init__(self, net: Transformer, k: int = 4, min_prob: float = 0.0, subset: VocabSubset | None = None,
                 max_len: int | None = None):
        if k < 1:
            raise ConfigError(f"draft needs k >= 1, got {k}")
        if not 0.0 <= min_prob < 1.0:
            raise ConfigError(f"draft needs 0 <= min_prob < 1, got {min_prob}")
        super().__init__(net.new_cache((max_len or net.max_len) + k + 1))
        self.net, self.k, self.min_prob = net, k, min_prob
        self.subset = None if subset is None else subset.to(net.device)
        self._ids_cpu = None if subset is None else subset.ids.cpu()       # for sampled drafts (q on the CPU)
        self.head = net.lm_head if subset is None else net.lm_head.rows(self.subset.ids)
        self.g: torch.Generator | None = None

    def reset(self, ctx: Context) -> None:
        super().reset(ctx)
        s = ctx.sampling
        self.g = None if s.greedy else torch.Generator("cpu").manual_seed(
            (s.seed if s.seed is not None else torch.seed()) + 0x5EED)

    def forward_draft(self, tokens, positions, mask, ctx, catch_up: bool) -> ForwardOut:
        out = self.net.forward(tokens, positions, self.cache, tree_mask=mask, compute_logits=False)
        out.logits = self.head(out.hidden[-1:] if catch_up else out.hidden)   # [1 or n, K or V]
        return out

    def _next(self, logits: torch.Tensor, ctx: Context) -> tuple[int, float, torch.Tensor | None]:
        """(token, the draft's top probability, q over the full vocabulary or None when greedy).

        The stopping rule looks at the top probability, never at the drawn token: a draw kept or
        dropped by its own value would no longer follow q, and sampling would stop being exact."""
        if self.g is None:
            probs = logits.float().softmax(-1)
            j = int(probs.argmax())
            tok = j if self.subset is None else int(self.subset.ids[j])
            return tok, float(probs[j]), None
        q = warp(logits, ctx.sampling).double().cpu()
        top = float(q.max())
        j = int(torch.multinomial(q, 1, generator=self.g))
        if self.subset is not None:
            q = q.new_zeros(self.subset.vocab_size).index_copy_(0, self._ids_cpu, q)
            j = int(self._ids_cpu[j])
        return j, top, q

    def draft(self, ctx: Context, first) -> DraftTree:
        k = min(self.k, max(0, ctx.remaining - 1))
        tokens, qs = [ctx.root], []
        logits = first.logits[-1]
        for d in range(k):
            tok, p, q = self._next(logits, ctx)
            if p < self.min_prob:
                break
            tokens.append(tok)
            qs.append(q)
            if d + 1 < k:
                tree = DraftTree.chain(ctx.root, tokens[1:], device=self.cache.k.device)
                logits = self.step(tree, [d + 1], ctx).logits[-1]
        tree = DraftTree.chain(ctx.root, tokens[1:], device=ctx.device)
        if qs and qs[0] is not None:
            rows = qs + [torch.zeros_like(qs[0])]                            # the last node has no child
            tree.q = torch.stack(rows)                                        # [n, V]
        return tree

    def describe(self) -> dict:
        return {"method": self.name, "k": self.k, "min_prob": self.min_prob,
                "vocab_subset": None if self.subset is None else self.subset.size}


class OptTreeDraft(DraftModel):
    """OPT-Tree shape (policies/opt_tree.py): layer-wise growth, one draft forward per layer,
    final tree = the nodes of largest p̂, as many as the target's cost curve pays for (or
    max_nodes). Deterministic children: greedy and sampled verification are both exact."""

    name = "opt-tree"

    def __init__(self, net: Transformer, width: int = 8, max_depth: int = 10, delta: float = 0.3,
                 max_nodes: int | None = None, cost=None, subset: VocabSubset | None = None,
                 max_len: int | None = None, calibrate: bool = True):
        if width < 1 or max_depth < 1 or delta < 0:
            raise ConfigError("opt-tree needs width >= 1, max_depth >= 1 and delta >= 0")
        super().__init__(net, k=max_depth, subset=subset, max_len=(max_len or net.max_len) + width * max_depth)
        self.width, self.max_depth, self.delta, self.max_nodes, self.cost = width, max_depth, delta, max_nodes, cost
        from draftwise.policies.opt_tree import Calibration

        self.calib = Calibration() if calibrate else None
        self._info: tuple[torch.Tensor, torch.Tensor] | None = None     # (top1, p) of the proposed nodes
        self._m_prev = width

    def draft(self, ctx: Context, first) -> DraftTree:
        from draftwise.policies.budget import best_prefix
        from draftwise.policies.opt_tree import grow, top_nodes

        depth = min(self.max_depth, max(0, ctx.remaining - 1))
        if depth == 0:
            return DraftTree.root_only(ctx.root, device=ctx.device)
        ids = None if self.subset is None else self.subset.ids

        def layer(tree: DraftTree, nodes: list[int]) -> torch.Tensor:
            return self.step(tree, nodes, ctx).logits.float().softmax(-1)

        # the layer width follows the tree size the budget kept last time (+2 to let it grow): on a CPU
        # the final tree holds a handful of nodes, and layers of `width` nodes would be drafted for nothing
        width = self.width if self.cost is None else max(2, min(self.width, self._m_prev + 2))
        tree, top1, p = grow(ctx.root, first.logits[-1:].float().softmax(-1), layer, width, min(depth, width),
                             self.delta, ids, self.calib)
        p_hat = torch.sort(tree.scores[1:].double(), descending=True).values
        if self.max_nodes is not None:
            m = min(self.max_nodes, p_hat.numel())
        elif self.cost is not None:
            m = best_prefix(p_hat[: self.width], self.cost, context=len(ctx.tokens))
            self._m_prev = m
        else:
            m = min(self.width, p_hat.numel())
        keep = top_nodes(tree, m)
        self._info = (top1[keep], p[keep])
        return tree.select(keep).to(ctx.device)

    def observe(self, tree, out, accepted, ctx) -> None:
        super().observe(tree, out, accepted, ctx)
        if self.calib is not None and self._info is not None and tree.size > 1:
            on_path = torch.zeros(tree.size, dtype=torch.bool)
            on_path[accepted.path] = True
            par = tree.parents.cpu()
            tested = torch.zeros(tree.size, dtype=torch.bool)
            tested[1:] = on_path[par[1:]]                     # its parent was accepted: the node was tried
            n = min(tree.size, self._info[0].numel())
            t = tested[:n]
            self.calib.update(self._info[0][:n][t], self._info[1][:n][t], on_path[:n][t])
        self._info = None
        if self.cost is not None and ctx.last_pass is not None:
            self.cost.observe(*ctx.last_pass, context=len(ctx.tokens))

    def describe(self) -> dict:
        return {"method": self.name, "width": self.width, "max_depth": self.max_depth, "delta": self.delta,
                "max_nodes": self.max_nodes, "vocab_subset": None if self.subset is None else self.subset.size}


def _subset(engine, k: int) -> VocabSubset | None:
    """The draft head's vocabulary subset (None: the full vocabulary)."""
    return engine.vocab_subset(k) if 0 < k < engine.draft_model.cfg.vocab_size else None


def _factory(engine, k: int, min_prob: float, vocab_subset: int) -> DraftModel:
    return DraftModel(engine.draft_model, k=k, min_prob=min_prob, subset=_subset(engine, vocab_subset),
                      max_len=engine.model.max_len)


methods.register(methods.MethodSpec(
    "draft", "a smaller model with the same tokenizer drafts a chain of k tokens (speculative sampling)",
    _factory, needs=("draft_model",),
    options={
        "k": methods.Option(int, 4, "most tokens drafted per step"),
        "min_prob": methods.Option(float, 0.0, "stop drafting when the draft's top probability falls below this"),
        "vocab_subset": methods.Option(int, 32768, "draft logits over the K most frequent tokens (0: full vocabulary)"),
    },
    test_opts={"k": 3, "vocab_subset": 0}))


def _opt_tree_factory(engine, width: int, max_depth: int, delta: float, max_nodes, vocab_subset: int,
                      calibrate: bool) -> OptTreeDraft:
    from draftwise.policies.budget import online_cost

    return OptTreeDraft(engine.draft_model, width=width, max_depth=max_depth, delta=delta, max_nodes=max_nodes,
                        cost=online_cost(engine, max_nodes), subset=_subset(engine, vocab_subset),
                        max_len=engine.model.max_len, calibrate=calibrate)


methods.register(methods.MethodSpec(
    "opt-tree", "a draft model grows an adaptive tree maximizing the expected acceptance length (OPT-Tree, "
    "arXiv 2406.17276)", _opt_tree_factory, needs=("draft_model",),
    options={
        "width": methods.Option(int, 8, "nodes per layer and most nodes in the final tree (paper: 50-60 on a GPU)"),
        "max_depth": methods.Option(int, 10, "deepest layer drafted"),
        "delta": methods.Option(float, 0.3, "grow another layer only while it raises E = sum of top p̂ by more"),
        "max_nodes": methods.MAX_NODES,
        "vocab_subset": methods.Option(int, 32768, "draft logits over the K most frequent tokens (0: full vocabulary)"),
        "calibrate": methods.Option(bool, True, "score nodes by learned acceptance rates instead of raw draft probabilities"),
    },
    test_opts={"width": 4, "max_depth": 4, "delta": 0.05, "max_nodes": 6, "vocab_subset": 0}))
