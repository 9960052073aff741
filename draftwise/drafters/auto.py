"""``auto``: one drafter over every source the engine has; it picks the mix per step by measured
tokens per second, and with the loop's guard it never drafts when nothing pays.

Terms
- sources: Token Recycling's matrix (always), retrieval (prompt lookup over the context, plus a
  datastore when given), and the draft model when the engine has one loaded.
- free arm: recycling's best template nodes (``candidate_nodes``: a few times the largest tree the cost
  curve pays for; all 80 on a GPU) and the retrieval trie fused into one tree (``fuse_lists``), scored
  in one parents-first pass (``fused_scores``). Each node's p̂ is the product of conditional acceptance rates along its path;
  a node's rate is the larger of those of the sources that proposed it, each the source's own
  online-calibrated estimate (recycling: accepted / drafted per template node; retrieval: its
  ``Calibration`` tables). Then one more, shared scale: per origin (recycling only, retrieval only,
  both), realized / expected accepted nodes of recent steps multiplies the p̂ of that origin's nodes
  (the planner picks the nodes whose estimates are high, so they run high: on MT-Bench the recycling-
  only nodes delivered 0.60 of their p̂, retrieval-only 0.72, both 0.92). The kept set is the
  best-p̂ prefix that maximizes expected tokens per ms of the step under the target's measured cost
  curve, this drafter's own time included.
- datastore gate: with a datastore, the free arm queries it while the tokens it decided (accepted nodes
  that no context match proposed and whose rate was the datastore's, not a lower one of recycling's)
  save more time than its search and its part of the trie cost
  (``SourceGate``: value = those tokens x ms per emitted token, against the measured ms, both averaged
  over its recent queries); otherwise only every 8th step, so it comes back when it starts to pay. A
  query returns continuations only as deep as the largest tree worth verifying (``store_query``: on a
  2-core CPU 32 continuations of 5 tokens instead of REST's 64 x 16, whose trie cost more than its extra
  nodes gave).
- model arm: the draft model's tree (a chain by default, ``model_tree``; its planner grows it only
  while it pays for both models' time), or with ``head`` an EAGLE head's chain on the target's own
  features (``head_length``), with the retrieval trie fused and pruned as RASD does; recycling learns
  from these passes too, and an EAGLE head reads the features of every pass, the free arm's included
  (``watch``), so its next catch-up pairs every token with its feature. A draft model with another tokenizer drafts by text
  (``model_cross`` string: its greedy continuation re-encoded by the target's tokenizer), which beat
  token-level intersection on every pair and set measured here.
- arm choice, per step: the free tree is planned every step (about a millisecond), so its expected
  tokens per second this step are known before any draft-model forward: (1 + c x sum of its kept
  p̂) / (t(kept + 1) + its own time), where c = realized / expected accepted tokens of recent free
  steps (the free arm's calibration, clipped to [0.25, 2]). The model arm runs when its realized tokens
  per second over its recent consecutive steps (drafting, target pass and bookkeeping timed:
  ``ArmRates``; the first model step after free steps is not counted: its catch-up over the tokens
  the free steps accepted is the cost of switching) beat that by ``switch_margin`` (either way: a
  switch to the model arm pays a catch-up now, a switch away one later), and at least every
  ``explore_every`` steps so its rate stays current; each exploration after which the free arm wins
  again doubles that gap (up to ``max_explore_every``; the model arm winning resets it): on a
  2-core AVX2 EPYC with the 1.5B + 0.5B pair, where the draft model paid no more than the free tree,
  explorations with their catch-ups every 16 steps cost auto ~10%. An exploration waits while the
  model arm's catch-up (``lag``: the tokens it has not fed, the whole prompt's window at a request's
  start) is longer than ``explore_lag``: a 256-token catch-up of the 0.5B costs ~20 steps of the 1.5B
  on that CPU; a model arm whose rate wins still runs, catch-up and all. So a long retrieval match
  (copying from the context) is verified without running the draft model, the draft model runs
  where retrieval has little to offer, and a draft model that does not pay even against a plain
  step (a free tree of one node) stops running; the loop's guard adds plain decoding as the last
  resort.
- origin bits per node: 1 recycling, 2 retrieval, 4 the model arm ("draft-model" or "eagle"; a node two
  sources proposed carries both); the loop counts accepted tokens per source from them (``Stats.sources``).
"""
from __future__ import annotations

import time

import torch

from draftwise.drafters import draft_model, eagle
from draftwise.drafters.base import Context, Drafter
from draftwise.drafters.rasd import Rasd
from draftwise.drafters.recycling import TokenRecycling
from draftwise.drafters.retrieval import KIND_STORE, RetrievalSource, load_store
from draftwise.drafters.spec import MethodSpec, Option
from draftwise.policies.budget import OnlineCost, Overhead, best_prefix
from draftwise.policies.guard import ArmRates, SourceGate
from draftwise.tree import DraftTree, fuse_lists

RECYCLING, RETRIEVAL, DRAFT_MODEL = 1, 2, 4


class Auto(Drafter):
    name = "auto"
    origin_bits = {RECYCLING: "recycling", RETRIEVAL: "retrieval", DRAFT_MODEL: "draft-model"}

    def __init__(self, recycling: TokenRecycling, source: RetrievalSource, cost: OnlineCost,
                 model: Rasd | None = None, max_nodes: int | None = None, model_name: str = "draft-model"):
        self.recycling, self.source, self.cost, self.model, self.max_nodes = recycling, source, cost, model, max_nodes
        self.model_name = model_name            # what the model arm drafts with: "draft-model" or "eagle"
        self.origin_bits = {RECYCLING: "recycling", RETRIEVAL: "retrieval", DRAFT_MODEL: model_name}
        self.needs = model.needs if model is not None else self.needs
        self.pausable = model is None or model.pausable
        # a long memory (~20 model steps): a short one let a few rejections freeze the model arm's rate
        # below the free tree's until the next exploration (chat, where acceptance comes in runs)
        self.arms = ArmRates(["model", "free"] if model is not None else ["free"], decay=0.95)
        self.overhead = Overhead()
        # realized / expected accepted tokens of the free arm; a prior of 8 tokens, so one wild step (a 16-node
        # retrieval chain trusted in full before its calibration has seen any) cannot sink the free arm's
        # estimate below the model arm's for the rest of the request (the free arm learns only when it runs)
        self.calib = _Calibration(prior=8.0)
        # per origin (1 recycling only, 2 retrieval only, 3 both): realized / expected accepted nodes
        self.source_calib = [_Calibration() for _ in range(4)]
        self.rec_nodes = candidate_nodes(cost, max_nodes, recycling.template_size - 1)
        # the datastore is queried while the tokens it decides save more time than its search costs
        self.store_gate = SourceGate() if source.store is not None else None
        self.explore_every = 16                 # the model arm runs at least this often while it wins ...
        self.max_explore_every = 256            # ... and at least this often after losing explorations
        self.switch_margin = 1.1                # an arm must beat the running one by this factor to replace it
        self.explore_lag = 32                   # explore only while the model arm's catch-up is this short
        self._explore_gap = self.explore_every
        self._exploring = False                 # the model arm runs because of an exploration
        self._steady = False                    # this model step follows a model step (no switch catch-up)
        self._explore_left = 0
        self._since_model = 0
        self._arm: str | None = None
        self._t_propose = 0.0
        self._kept: dict | None = None          # the free arm's bookkeeping for observe

    # ------------------------------------------------------------------ drafter API
    def reset(self, ctx: Context) -> None:
        if self.model is not None:
            self.model.reset(ctx)               # the draft model's cache and the retrieval source
        else:
            self.source.reset(ctx)

    def begin(self, ctx: Context, out) -> None:
        if self.model is not None:
            self.model.begin(ctx, out)

    def propose(self, ctx: Context) -> DraftTree:
        t0 = time.perf_counter()
        with self.overhead:
            tree, bits, free_rate = self._free(ctx)
        if self.choose_arm(free_rate, self.model.lag(ctx) if self.model is not None else 0) == "model":
            self.overhead.discard()             # the free tree's planning is charged to the model step
            self._kept = None
            tree = self.model.propose(ctx)
            bits = torch.full((tree.size,), RETRIEVAL, dtype=torch.int8)
            bits[: self.model.last_base_size] = DRAFT_MODEL
            bits[0] = 0
        tree.origin = bits.to(tree.tokens.device)
        self._t_propose = time.perf_counter() - t0
        return tree

    def observe(self, tree: DraftTree, out, accepted, ctx: Context) -> None:
        t0 = time.perf_counter()
        if self._arm == "model":
            self.model.observe(tree, out, accepted, ctx)
            self.recycling.learn_rows(tree.tokens, out.logits)
        else:
            with self.overhead:
                if tree.size > 1:
                    self.calib.add(self._kept["expected"], len(accepted.tokens) - 1)
                self._learn(tree, out, accepted)
            self.overhead.commit()
            if self.model is not None:
                self.model.watch(tree, out, accepted, ctx)     # an EAGLE head keeps every pass's features
            self.source.remember(ctx)
            if ctx.last_pass is not None:
                self.cost.observe(*ctx.last_pass, context=len(ctx.tokens))
        verify_s = ctx.last_pass[1] / 1e3 if ctx.last_pass is not None else 0.0
        if self._arm == "free" or self._steady:     # a switch's catch-up is the switch's cost, not the arm's rate
            self.arms.record(self._arm, len(accepted.tokens), self._t_propose + verify_s + time.perf_counter() - t0)

    def watch(self, tree: DraftTree, out, accepted, ctx: Context) -> None:
        self.recycling.learn_rows(tree.tokens, out.logits)
        if self.model is not None:
            self.model.watch(tree, out, accepted, ctx)

    def choose_arm(self, free_rate: float, lag: int = 0) -> str:
        """The arm of this step, given the free tree's expected tokens per second and the tokens the model arm
        would catch up on first (module docstring)."""
        if self.model is None:
            self._arm = "free"
            return "free"
        rate = self.arms.rates["model"]
        if self._explore_left > 0 or rate.steps < self.arms.trial:
            arm = "model"
            self._explore_left = max(0, self._explore_left - 1)
        elif self._since_model >= self._explore_gap and lag <= self.explore_lag:
            arm, self._explore_left = "model", 1      # the switch, then one step whose rate counts
            self._exploring = True
        else:
            if self._arm == "model":                  # either switch pays a catch-up, now or on the way back
                arm = "model" if rate.value * self.switch_margin > free_rate else "free"
            else:
                arm = "model" if rate.value > free_rate * self.switch_margin else "free"
            if self._exploring and arm == "free":     # an exploration the model arm lost: explore less often
                self._explore_gap = min(self.max_explore_every, 2 * self._explore_gap)
            elif arm == "model":
                self._explore_gap = self.explore_every
            self._exploring = self._exploring and arm == "model"
        self._steady = arm == "model" and self._arm == "model"
        self._since_model = 0 if arm == "model" else self._since_model + 1
        self._arm = arm
        return arm

    # ------------------------------------------------------------------ the free arm
    def _free(self, ctx: Context) -> tuple[DraftTree, torch.Tensor, float]:
        """The free arm's tree, its origin bits, and (with a draft model) its expected tokens per second."""
        # plain Python over the ~10-50 candidate nodes, where numpy's and torch's per-call cost (~3x its isolated
        # cost after a forward pass has flushed the caches) was most of the step's overhead; only the kept tree
        # becomes a DraftTree
        ids, toks, pars, rs = self.recycling.best_candidates(ctx, self.rec_nodes)
        T = len(toks)
        rate = [1.0] + [rs[i] / rs[pars[i]] for i in range(1, T)]    # an estimate never exceeds its parent's
        bits = [0] + [RECYCLING] * (T - 1)
        ret_of = [-1] * T                                          # fused node -> retrieval trie node
        ret_led = [False] * T                                      # the node's rate is retrieval's
        use_store = self.store_gate is not None and self.store_gate.open()
        cand = self.source.candidates(ctx, use_store=use_store)
        if cand is not None:
            b, bp = cand.tree.scores.tolist(), cand.tree.parents.tolist()
            toks, pars, mapping = fuse_lists(toks, pars, cand.tree.tokens.tolist(), bp)
            extra = len(toks) - T
            rate, bits, ret_of = rate + [0.0] * extra, bits + [0] * extra, ret_of + [-1] * extra
            ret_led += [False] * extra
            for j in range(1, len(mapping)):
                i, pb = mapping[j], b[bp[j]]
                r = b[j] / pb if pb > 1e-12 else 0.0
                if r >= rate[i]:
                    rate[i] = r
                    ret_led[i] = True
                bits[i] |= RETRIEVAL
                ret_of[i] = j
        raw, score, depth = fused_scores(rate, bits, pars, [1.0] + [c.ratio for c in self.source_calib[1:]])
        limit = max(1, ctx.remaining)
        order = sorted((i for i in range(1, len(toks)) if score[i] > 0 and depth[i] < limit),
                       key=score.__getitem__, reverse=True)        # best first; parents first on ties (stable)
        if self.cost.probe_due():
            k = 0                                                  # a timed one-node pass keeps t(1) measured
        else:
            k = best_prefix([score[i] for i in order], self.cost, self.max_nodes, self.overhead.ms, len(ctx.tokens),
                            patience=8)
        keep = [0] + sorted(order[:k])
        expected = sum(score[i] for i in keep[1:])
        free_rate = 0.0                                            # expected tokens/s: only the arm choice reads it
        if self.model is not None:
            ms = float(self.cost.t(k + 1, len(ctx.tokens))) + (self.overhead.ms if k else 0.0)
            free_rate = (1.0 + min(max(self.calib.ratio, 0.25), 2.0) * expected) / ms * 1e3
        remap = {j: i for i, j in enumerate(keep)}
        kept_bits = [bits[i] for i in keep]
        self._kept = {"bits": kept_bits, "expected": expected, "raw": [raw[i] for i in keep],
                      "template": [ids[i] if i < T else -1 for i in keep], "ret_of": [ret_of[i] for i in keep],
                      "ret_led": [ret_led[i] for i in keep],
                      "cand": cand, "store_queried": use_store}
        tree = DraftTree(torch.tensor([toks[i] for i in keep]), torch.tensor([remap.get(pars[i], -1) for i in keep]),
                         torch.tensor([depth[i] for i in keep]), scores=torch.tensor([score[i] for i in keep]))
        return tree, torch.tensor(kept_bits, dtype=torch.int8), free_rate

    def _learn(self, tree: DraftTree, out, accepted) -> None:
        k = self._kept
        path = accepted.path
        on_path = [False] * tree.size
        for i in path:
            on_path[i] = True
        bits = k["bits"]
        if tree.size > 1:                                         # each origin's calibration
            exp, got = [0.0] * 4, [0] * 4
            for i in range(1, tree.size):
                exp[bits[i]] += k["raw"][i]
                got[bits[i]] += on_path[i]
            for o in (1, 2, 3):
                if exp[o] > 0:
                    self.source_calib[o].add(exp[o], got[o])
        self.recycling.learn_rows(tree.tokens, out.logits)       # every node teaches the matrix
        rec = [i for i in range(tree.size) if i == 0 or bits[i] & RECYCLING]   # the root is template node 0
        self.recycling.record_lists([k["template"][i] for i in rec], [on_path[i] for i in rec])
        if k["store_queried"]:                                   # tokens the datastore decided
            kinds = k["cand"].kind.tolist() if k["cand"] is not None else []
            ret_of, led = k["ret_of"], k["ret_led"]
            gained = sum(1 for i in path[1:] if led[i] and kinds[ret_of[i]] == KIND_STORE)
            rate = self.arms.rates["free"].value
            ms_per_token = 1e3 / rate if rate > 0 else float(self.cost.t(1))
            self.store_gate.record(gained, ms_per_token, self.source.store_ms)
        if k["cand"] is not None:
            par = tree.parents.tolist()
            tried = [i for i in range(1, tree.size) if bits[i] & RETRIEVAL and on_path[par[i]]]   # its parent accepted
            if tried:
                j = torch.tensor([k["ret_of"][i] for i in tried])
                c = k["cand"]
                self.source.learn(c.top1[j], c.share[j], c.kind[j], torch.tensor([on_path[i] for i in tried]))
        self._kept = None

    def describe(self) -> dict:
        return {"method": self.name, "sources": ["recycling", "retrieval"] + ([self.model_name] if self.model else []),
                "datastore": None if self.source.store is None else str(self.source.store.path),
                "arm_tokens_per_s": {a: round(r.value, 2) for a, r in self.arms.rates.items()},
                **({"datastore_value_vs_cost_ms": [round(self.store_gate.value, 2), round(self.store_gate.cost, 2)]}
                   if self.store_gate is not None else {})}


def affordable_nodes(cost, limit: int) -> int:
    """The largest n (at most ``limit``) such that a pass over the root and n draft nodes costs at most twice a
    one-token pass on the cost curve: on a 2-core CPU ~4, on a GPU the limit. Larger trees rarely pay."""
    t1, n = float(cost.t(1)), 1
    while n < limit and float(cost.t(n + 2)) <= 2.0 * t1:
        n += 1
    return n


def candidate_nodes(cost, max_nodes: int | None, template: int) -> int:
    """How many of recycling's template nodes (best estimates first) the free arm scores each step: three times
    the largest tree worth verifying, at least 12: max_nodes when given, else ``affordable_nodes`` (on a 2-core
    CPU ~4, so 12 of the 80 nodes; on a GPU all). The kept set rarely reaches past the best few; the rest were
    scored every step for nothing."""
    if max_nodes is None:
        max_nodes = affordable_nodes(cost, template)
    return min(template, max(12, 3 * max_nodes))


def store_query(cost, max_nodes: int | None) -> tuple[int, int]:
    """(continuations, tokens each) of the datastore's answer per step: as deep as the largest tree worth
    verifying (max_nodes, else ``affordable_nodes``) plus one, and 8 continuations per such node, within
    REST's 64 x 16. A query's cost is mostly the trie its tokens make (Python, per token): on a 2-core CPU,
    where kept trees hold 2-5 nodes, 64 x 16 tokens added 1.2 ms a step to auto's drafting against a 15 ms
    pass of the 0.5B, 32 x 5 0.6 ms (MT-Bench, chat datastore), and the cheaper query ran on more steps."""
    n = max_nodes if max_nodes is not None else affordable_nodes(cost, 16)
    return min(64, max(16, 8 * n)), min(16, max(4, n + 1))


def fused_scores(rate: list[float], bits: list[int], parents: list[int],
                 factor: list[float]) -> tuple[list[float], list[float], list[int]]:
    """One parents-first pass over a fused tree (root 0): (raw, score, depth) per node. raw: the product of
    the conditional rates (clipped to [0, 1]) along the node's path; score: raw times its origin's
    calibration factor (``factor[bits]``, clipped to [0.25, 2]), capped at its parent's score and at 1 (so
    a kept set stays parents-first; the root stays 1)."""
    f = [min(max(x, 0.25), 2.0) for x in factor]
    n = len(parents)
    raw, score, depth = [1.0] * n, [1.0] * n, [0] * n
    for i in range(1, n):
        p = parents[i]
        raw[i] = raw[p] * min(max(rate[i], 0.0), 1.0)
        score[i] = min(raw[i] * f[bits[i]], score[p], 1.0)
        depth[i] = depth[p] + 1
    return raw, score, depth


class _Calibration:
    """Realized / expected accepted draft tokens over recent steps (decayed sums that start at 2 tokens
    each: ratio 1 until steps say otherwise)."""

    def __init__(self, decay: float = 0.95, prior: float = 2.0):
        self.decay, self.expected, self.realized = decay, prior, prior

    def add(self, expected: float, realized: int) -> None:
        self.expected = self.expected * self.decay + expected
        self.realized = self.realized * self.decay + realized

    @property
    def ratio(self) -> float:
        return self.realized / self.expected if self.expected > 0 else 1.0


def _factory(engine, datastore, online: bool, max_nodes, use_draft: bool, model_tree: str, model_cross: str,
             head, head_length: str, store_conts, store_len) -> Auto:
    store = load_store(engine, datastore, online)
    conts, length = store_query(engine.cost_curve(), max_nodes)
    source = RetrievalSource(store, lookup=True, online=online, max_conts=store_conts or conts,
                             store_len=store_len or length)
    rec = TokenRecycling(engine.model.cfg.vocab_size, device="cpu")
    model, name = None, "draft-model"
    if head is not None:                       # the model arm drafts with an EAGLE head on the target's features
        base = eagle.SPEC.factory(engine, **eagle.SPEC.validate({"head": head, "length": head_length}))
        model, name = Rasd(base, source, cost=OnlineCost(engine.cost_curve())), "eagle"
    elif use_draft and engine.draft_model is not None:
        cross = model_cross if model_tree == "chain" else "tli"       # string-level drafts are chains
        base = draft_model.SPEC.factory(engine, **draft_model.SPEC.validate({"tree": model_tree, "cross": cross}))
        model = Rasd(base, source, cost=OnlineCost(engine.cost_curve()))
    return Auto(rec, source, OnlineCost(engine.cost_curve()), model=model, max_nodes=max_nodes, model_name=name)


SPEC = MethodSpec(
    "auto", "every source the engine has (Token Recycling, retrieval from the context and a datastore, the draft "
    "model when loaded or an EAGLE head) fused into one tree, the mix chosen per step by measured tokens/s", _factory,
    options={
        "datastore": Option(str, None, "datastore file for retrieval (draftwise datastore build); null: the "
                                    "context only", optional=True, path=True),
        "online": Option(bool, False, "add each finished sequence to the datastore's in-memory overlay"),
        "store_conts": Option(int, None, "datastore continuations per step (null: 8 per node of the largest "
                                         "tree worth verifying, 16-64)", optional=True, lo=1, hi=1024),
        "store_len": Option(int, None, "tokens per datastore continuation (null: that tree's size + 1, 4-16)",
                            optional=True, lo=1, hi=64),
        "max_nodes": Option(int, None, "most nodes verified per step without the draft model (null: the "
                                    "cost curve decides)", optional=True, lo=1, hi=256),
        "use_draft": Option(bool, True, "use the engine's draft model when one is loaded"),
        "model_tree": Option(str, "chain", "the draft model's shape in the model arm (draft-model's tree "
                                           "option; chain: fastest with the 1.5B + 0.5B pair on this CPU)",
                             choices=draft_model.SHAPES),
        "model_cross": Option(str, "string", "a draft model with another tokenizer: draft-model's cross option "
                                             "(string: 1.41x vs TLI 1.24x, 1.5B + SmolLM2 on HumanEval; string "
                                             "drafts chains: with another model_tree the arm uses tli)",
                              choices=draft_model.CROSS),
        "head": Option(str, None, "an EAGLE head for the model arm (as eagle's head option; it replaces the draft "
                                  "model there): its chain is fused with retrieval and run when it pays",
                       optional=True, path=True, words=("untrained", "untrained-eagle3")),
        "head_length": Option(str, "fixed:1", "the EAGLE head's chain length (eagle's length option; fixed:1 was "
                                              "its best on the 0.5B)"),
    },
    test_opts=[{}, {"max_nodes": 6}, {"use_draft": False},
               {"head": "untrained", "head_length": "fixed:2"}, {"head": "untrained-eagle3"}])
