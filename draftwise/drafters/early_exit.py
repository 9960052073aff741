"""EESD (arXiv 2406.03853): the target drafts for itself with its first N layers plus one trained
early-exit layer, read out through its final norm and LM head (method ``early-exit``).

Terms
- N (``layer``): how many of the target's layers draft. Drafting a token runs layers [0, N) of
  the target in the target's own KV cache (pending rows: no second copy of those layers' cache),
  then the exit layer with its own one-layer cache, then the final norm and the (vocabulary-
  subset) head.
- exit layer: one decoder layer of the target's architecture, initialised from a target layer
  and trained by self-distillation (``train_exit``): KL(target || draft) on the target's top-k
  next-token distribution over training text. ``exit: null`` drafts with no exit layer (layer
  N's output straight into the final norm and head: what Hugging Face's ``assistant_early_exit``
  / LayerSkip do with an untrained model).
- reuse: verification starts at layer N. Every node of the chain (root included) went through
  layers [0, N) while drafting; their rows sit in the target cache's pending slots and their
  layer-N inputs travel in the proposal (``Proposal.start_layer``, ``hidden_in``), so the target
  pass runs only layers [N, L).
- control: how long each chain is (policies/length.py): ``fixed:K``, ``beta-ts``,
  ``calibration-ts``.

Cache invariant: at ``propose`` the exit cache holds ctx.tokens[:-1] (the root is new) except
for ``lag``: committed tokens whose exit rows are still owed. Every chain node is fed to the exit
layer as a pending row and ``observe`` commits the accepted ones. A plain step (the control chose
k = 0) runs only the root's first N layers (which verification reuses, so it costs what a plain
decoding step costs) and owes the root's exit row; the next drafting step pays the owed rows in
one exit forward before its own.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from draftwise.drafters.base import Context, Drafter, Needs, Proposal
from draftwise.drafters.model_base import next_token
from draftwise.drafters.spec import VOCAB_SUBSET, MethodSpec, Option
from draftwise.errors import CheckpointError, ConfigError
from draftwise.models.cache import KVCache
from draftwise.models.layers import Layer, build_layer, layer_forward, rms_norm
from draftwise.models.layout import layer_names, layer_shapes
from draftwise.models.transformer import Transformer
from draftwise.policies.length import CONTROLS, LengthControl, StepCosts, check_name, parse_control
from draftwise.tree import DraftTree
from draftwise.vocab import VocabSubset, subset_for

KIND = "draftwise-early-exit"
PREFIX = "model.layers.0."


# ---------------------------------------------------------------------- the exit layer on disk
def save_exit(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """tensors: Hugging Face layer names (``model.layers.0.*``); meta: JSON-able (layer, fingerprint...)."""
    from draftwise.parts import save_tensors

    save_tensors(path, tensors, KIND, meta)


def load_exit(path: str | Path, model: Transformer) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, meta) of a saved exit layer, checked against the target (one-line errors)."""
    from draftwise.parts import check_part, read_tensors

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"exit layer {path} not found (train one: draftwise train early-exit --model M "
                              f"--layer N --out {path})")
    tensors, meta = read_tensors(path, "exit layer")
    check_part(meta, KIND, model, "early-exit layer", path)
    n = meta.get("layer")
    if not isinstance(n, int) or not 1 <= n < model.cfg.num_layers:
        raise CheckpointError(f"exit layer {path} has layer {n!r}; the target has {model.cfg.num_layers} layers")
    want = {PREFIX + k for k in layer_names(model.cfg)}
    if set(tensors) != want:
        raise CheckpointError(f"exit layer {path} is missing tensors {sorted(want - set(tensors))[:3]}")
    ref = layer_shapes(model.cfg, PREFIX)
    for k, t in tensors.items():
        if tuple(t.shape) != ref[k]:
            raise CheckpointError(f"exit layer {path}: {k} has shape {tuple(t.shape)}, the target needs {ref[k]}")
    return tensors, meta


def exit_layer(model: Transformer, tensors: dict[str, torch.Tensor], packed: bool | None = None) -> Layer:
    """A Layer (the target's layer code) from exit tensors, on the target's device and dtype."""
    def get(name: str, required: bool = True):
        t = tensors.get(name)
        if t is None and required:
            raise CheckpointError(f"exit layer is missing tensor {name!r}")
        return None if t is None else t.to(device=model.device, dtype=model.dtype)

    return build_layer(model.cfg, get, PREFIX, model.fast if packed is None else packed)


# ---------------------------------------------------------------------- drafter
class EarlyExit(Drafter):
    name = "early-exit"
    pausable = False          # exit rows follow every target pass; its own control takes plain steps (k = 0)

    def __init__(self, model: Transformer, layer: int, control: LengthControl, exit: Layer | None = None,
                 subset: VocabSubset | None = None, costs: StepCosts | None = None):
        if not 1 <= layer < model.cfg.num_layers:
            raise ConfigError(f"early-exit layer must be in [1, {model.cfg.num_layers - 1}] for this "
                              f"{model.cfg.num_layers}-layer target, got {layer}")
        self.model, self.n, self.control, self.exit, self.costs = model, layer, control, exit, costs
        self.needs = Needs(hidden_layers=(layer - 1,))
        self.subset = None if subset is None else subset.to(model.device)
        self._ids_cpu = None if subset is None else subset.ids.cpu()
        self.head = model.lm_head if subset is None else model.lm_head.rows(self.subset.ids)
        c = model.cfg
        extra = control.k_max + 2
        self.cache = KVCache(1, c.num_kv_heads, model.max_len + extra, c.head_dim, model.dtype, model.device) \
            if exit is not None else None
        self.g: torch.Generator | None = None
        self._confs: list[float] = []
        self.lag: list[tuple[torch.Tensor, int]] = []       # (layer-N input [1, D], position) owed to the exit cache
        self._plain: tuple[torch.Tensor, int] | None = None

    # ------------------------------------------------------------------ network
    def exit_forward(self, h: torch.Tensor, positions: torch.Tensor, logits: bool) -> torch.Tensor | None:
        """Exit layer (own cache, rows held pending) + final norm + head over h [n, D] -> [n, K]."""
        m = self.model
        if self.exit is not None:
            cache, n = self.cache, h.shape[0]
            start = cache.reserve(n)
            mask = m.attn_mask(n, cache.length, cache.pending, None)
            cos, sin = m.cos[positions].unsqueeze(1), m.sin[positions].unsqueeze(1)
            h = layer_forward(m.cfg, self.exit, h, cos, sin, lambda k, v: cache.write(0, k, v, start), mask)
            cache.hold(n)
        if not logits:
            return None
        return self.head(rms_norm(h, m.norm, m.cfg.rms_norm_eps))

    def reset(self, ctx: Context) -> None:
        if self.cache is not None:
            self.cache.truncate(0)
        self.lag, self._plain = [], None
        s = ctx.sampling
        self.g = None if s.greedy else torch.Generator("cpu").manual_seed(
            (s.seed if s.seed is not None else torch.seed()) + 0xEE5D)

    def begin(self, ctx: Context, out) -> None:
        if self.exit is not None:                  # the prompt through the exit layer, committed
            h = out.layer_hidden[self.n - 1]
            self.exit_forward(h, torch.arange(h.shape[0], device=h.device), logits=False)
            self.cache.commit(h.shape[0])

    def propose(self, ctx: Context) -> Proposal:
        m, cache = self.model, ctx.cache
        t0 = time.perf_counter()
        base = cache.length
        k_max = min(self.control.plan(len(ctx.tokens)), max(0, ctx.remaining - 1))
        toks, hs, qs, self._confs = [ctx.root], [], [], []
        dev = m.device
        self._plain = None
        if self.lag and (k_max > 0 or len(self.lag) >= 64):   # pay the owed exit rows (committed)
            self.exit_forward(torch.cat([h for h, _ in self.lag]),
                       torch.tensor([p for _, p in self.lag], device=dev), logits=False)
            self.cache.commit(len(self.lag))
            self.lag = []
        if k_max == 0 and self.exit is not None:        # a plain step: the root's exit row is owed
            pos = torch.tensor([base], device=dev)
            h = m.forward(torch.tensor([ctx.root], device=dev), pos, cache, end_layer=self.n).hidden
            cache.hold(1)
            self._plain = (h, base)
            tree = DraftTree.root_only(ctx.root, device=dev)
            if self.costs is not None:
                self.costs.observe_draft(0, (time.perf_counter() - t0) * 1e3)
            return Proposal(tree, start_layer=self.n, hidden_in=h)
        for d in range(k_max + 1):
            pos = torch.tensor([base + d], device=dev)
            h = m.forward(torch.tensor([toks[-1]], device=dev), pos, cache, end_layer=self.n).hidden   # [1, D]
            cache.hold(1)
            hs.append(h)
            logits = self.exit_forward(h, pos, logits=d < k_max)
            if logits is None:
                break
            tok, conf, q = next_token(logits[0], ctx.sampling, self.g, self._ids_cpu, m.cfg.vocab_size)
            if not self.control.more(d, conf):
                break
            toks.append(tok)
            qs.append(q)
            self._confs.append(conf)
        tree = DraftTree.chain(ctx.root, toks[1:], device=dev, q=qs)
        if self.costs is not None:
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            self.costs.observe_draft(len(hs), (time.perf_counter() - t0) * 1e3)
        return Proposal(tree, start_layer=self.n, hidden_in=torch.cat(hs))

    def observe(self, tree, out, accepted, ctx) -> None:
        if self._plain is not None:
            self.lag.append(self._plain)
            self._plain = None
        elif self.cache is not None:
            self.cache.commit(list(accepted.path))
        self.control.update(self._confs, len(accepted.path) - 1)
        if self.costs is not None and ctx.last_pass is not None:
            self.costs.verify.observe(*ctx.last_pass, context=len(ctx.tokens))

    def describe(self) -> dict:
        return {"method": self.name, "layer": self.n, "exit": self.exit is not None,
                "length": self.control.describe(), "vocab_subset": None if self.subset is None else self.subset.size}


def _factory(engine, exit, layer, length: str, max_depth: int, vocab_subset: int) -> EarlyExit:
    from draftwise.policies.budget import OnlineCost

    model = engine.model
    L = model.cfg.num_layers
    layer_t = None
    if exit is not None:
        tensors, meta = load_exit(exit, model)
        if layer is not None and layer != meta["layer"]:
            raise ConfigError(f"exit layer {exit} was trained after layer {meta['layer']}, not {layer}: drop 'layer'")
        layer = meta["layer"]
        layer_t = exit_layer(model, tensors)
    elif layer is None:
        raise ConfigError("method 'early-exit' needs an exit layer (--method-opts '{\"exit\": PATH}', trained by "
                          "draftwise train early-exit) or, untrained, a layer count ('{\"layer\": N}')")
    if not 1 <= layer < L:
        raise ConfigError(f"early-exit layer must be in [1, {L - 1}] for this {L}-layer target, got {layer}")
    costs = None
    if not length.startswith("fixed:"):
        full = engine.cost_curve()
        rest = (L - layer) / L                                  # verification runs layers [N, L) only
        verify = OnlineCost(full.scaled(rest))
        t1 = float(full.t(1))
        costs = StepCosts(verify, draft_ms=t1 * (layer + (layer_t is not None)) / L, plain_ms=t1 * layer / L)
    ctl = parse_control(length, costs, max_depth)
    sub = subset_for(engine, vocab_subset, model.cfg.vocab_size)
    return EarlyExit(model, layer, ctl, exit=layer_t, subset=sub, costs=costs)


SPEC = MethodSpec(
    "early-exit", "EESD: the target's first N layers + a trained exit layer draft a chain, Thompson sampling "
    "sets its length (arXiv 2406.03853)", _factory,
    options={
        "exit": Option(str, None, "trained exit layer (draftwise train early-exit); null: no exit layer, "
                               "layer N's output read out directly (untrained, like HF assistant_early_exit)",
                               optional=True, path=True),
        "layer": Option(int, None, "N, the target layers that draft (taken from the exit layer's file)",
                                optional=True, lo=1, hi=1024),
        "length": Option(str, "beta-ts", "draft length: fixed:K | beta-ts | calibration-ts"),
        "max_depth": Option(int, 8, "most tokens drafted per step", lo=1, hi=32),
        "vocab_subset": VOCAB_SUBSET,
    },
    check=lambda o: check_name(o["length"], CONTROLS, "early-exit option 'length'", o["max_depth"]),
    renamed={"control": "length", "k_max": "max_depth"},
    test_opts=[{"layer": 1, "length": "fixed:3", "vocab_subset": 0},
               {"layer": 1, "length": "beta-ts", "max_depth": 5, "vocab_subset": 0},
               {"layer": 1, "length": "calibration-ts", "max_depth": 5, "vocab_subset": 0}])
