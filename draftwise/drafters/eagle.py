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
from pathlib import Path

import torch

from draftwise.drafters import eagle3
from draftwise.drafters.base import Context, Needs
from draftwise.drafters.draft_model import DraftModel
from draftwise.drafters.spec import VOCAB_SUBSET, MethodSpec, Option
from draftwise.errors import CheckpointError, ConfigError
from draftwise.models.cache import KVCache
from draftwise.models.layers import ForwardOut, Layer, build_layer, layer_forward
from draftwise.models.layout import LINEARS, layer_names, layer_shapes
from draftwise.models.transformer import Transformer
from draftwise.policies.length import LENGTHS, LengthControl, StepCosts, check_name, parse_length
from draftwise.tree import DraftTree
from draftwise.vocab import VocabSubset, subset_for

KIND = "draftwise-eagle-head"
LP = "layers.0."                                   # the head's layer prefix (EAGLE-1/2 layout)
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


# ---------------------------------------------------------------------- the head
class EagleHead:
    """fc over [embedding ⊕ feature] -> one decoder layer -> predicted next feature [n, D]."""

    def __init__(self, target: Transformer, fc_w: torch.Tensor, fc_b: torch.Tensor | None, layer: Layer,
                 cfg, meta: dict | None = None, packed: bool | None = None, quant: dict | None = None):
        packed = target.fast if packed is None else packed
        dev, dt = target.device, target.dtype
        self.target, self.cfg, self.layer, self.meta = target, cfg, layer, dict(meta or {})
        self.fc = eagle3.head_linear(fc_w.to(dev, dt), quant, "fc.weight", packed,    # Q8_0 on the GGUF path
                                     None if fc_b is None else fc_b.to(dev, dt))
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
        mask = t.attn_mask(n, cache.length, cache.pending, tree_mask)
        cos, sin = t.cos[positions].unsqueeze(1), t.sin[positions].unsqueeze(1)
        return layer_forward(self.cfg, self.layer, x, cos, sin, lambda k, v: cache.write(0, k, v, start), mask, t.glue)


def head_names(cfg, input_norm: bool, fc_bias: bool) -> list[str]:
    names = ["fc.weight"] + (["fc.bias"] if fc_bias else [])
    return names + [LP + n for n in layer_names(cfg) if input_norm or n != "input_layernorm.weight"]


def head_shapes(model: Transformer) -> dict[str, tuple[int, ...]]:
    D = model.cfg.hidden_size
    return {**layer_shapes(model.cfg, LP), "fc.weight": (D, 2 * D), "fc.bias": (D,)}


def head_from_tensors(model: Transformer, tensors: dict[str, torch.Tensor], meta: dict, where: str,
                      packed: bool | None = None) -> EagleHead:
    """Check names and shapes against the target and build the head (one-line errors)."""
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

    quant = eagle3.q8_linears(model, tensors, ["fc.weight"] + [LP + n + ".weight" for n in LINEARS])
    layer = build_layer(cfg, get, LP, model.fast if packed is None else packed, input_norm=input_norm, quant=quant)
    return EagleHead(model, tensors["fc.weight"], tensors.get("fc.bias"), layer, cfg, meta, packed, quant=quant)


def save_head(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    from draftwise.parts import save_tensors

    save_tensors(path, tensors, KIND, meta)


def _read_weights(f: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from draftwise.parts import read_tensors

    if f.suffix != ".bin":
        return read_tensors(f, "draft head")
    try:
        return torch.load(f, map_location="cpu", weights_only=True), {}
    except Exception as e:   # torch.load raises several types for truncated or corrupt files
        raise CheckpointError(f"draft head {f} is unreadable ({e})") from None


def load_head(path: str | Path, model: Transformer, packed: bool | None = None) -> EagleHead:
    """A head trained here (``.safetensors`` with draftwise metadata) or a public EAGLE-1/2 head
    (a directory with config.json and weights, or the weights file itself)."""
    from draftwise.parts import check_part

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
        check_part(meta, KIND, model, "EAGLE head", f)
        if eagle3.is_eagle3(tensors):
            return eagle3.load_ours(model, tensors, meta, str(f), packed)
    elif eagle3.is_eagle3(tensors):                          # public EAGLE-3
        return eagle3.load_public(model, tensors, _config(config), str(path), packed)
    else:                                                    # public EAGLE-1/2
        tensors = {k: v for k, v in tensors.items() if k != "embed_tokens.weight"}
        c = _config(config)
        if c is not None:
            mc = model.cfg
            for key, have in (("hidden_size", mc.hidden_size), ("vocab_size", mc.vocab_size),
                              ("num_attention_heads", mc.num_heads), ("rope_theta", mc.rope_theta)):
                if key in c and c[key] != have:
                    raise CheckpointError(f"EAGLE head {path} has {key} {c[key]}, the target has {have}")
            if c.get("num_hidden_layers", 1) != 1:
                raise CheckpointError(f"EAGLE head {path} has {c['num_hidden_layers']} layers; EAGLE-1/2 heads have 1")
        meta = {"source": "eagle", "path": str(path)}
    return head_from_tensors(model, tensors, meta, str(f), packed)


def read_head(path: Path, model: Transformer) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of an EAGLE-3 head trained here for this target (what export writes out)."""
    from draftwise.parts import check_part

    if not Path(path).is_file():
        raise CheckpointError(f"draft head {path} not found (train one: draftwise train eagle --arch eagle3)")
    tensors, meta = _read_weights(Path(path))
    if not meta:
        raise CheckpointError(f"{path} is not a head trained by draftwise (nothing to export)")
    check_part(meta, KIND, model, "EAGLE head", path)
    if not eagle3.is_eagle3(tensors):
        raise CheckpointError(f"{path} is an EAGLE-1 head; only EAGLE-3 heads export to the EAGLE-3 layout")
    return tensors, meta


def _config(config: Path | None) -> dict | None:
    if config is None:
        return None
    try:
        c = json.loads(config.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{config} is not a readable config ({e})") from None
    if not isinstance(c, dict):
        raise CheckpointError(f"{config} is not a config object")
    return c


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
    pausable = True           # a step it did not draft still hands it the pass's features (watch)
    keep_drafted_rows = False  # drafted rows came from predicted features: re-fed with the real ones
    restartable = False        # row j pairs the target's feature at position j - 1: positions stay absolute

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
        self.v3 = isinstance(head, eagle3.Eagle3Head)
        if self.v3:                                   # the fused features of three target layers
            self.needs = Needs(hidden_layers=head.aux, final_hidden=True)
        width = 3 * head.target.cfg.hidden_size if self.v3 else head.cfg.hidden_size
        self.feats = torch.zeros(head.max_len + 1, width, dtype=head.dtype, device=head.device)
        self.nf = 0                                   # feats[:nf] = f of the tokens in the target cache
        self.last_f: torch.Tensor | None = None       # the final-norm feature of the last committed token (LDLP)
        self._pred: dict[int, torch.Tensor] = {}      # tree node -> predicted feature after it [D]
        self._at: tuple[DraftTree, list[int]] | None = None
        # per step when a list: (root, f of the last committed token, drafted tokens, accepted count)
        self.log: list[tuple[int, torch.Tensor, list[int], int]] | None = None

    def reset(self, ctx: Context) -> None:
        super().reset(ctx)
        self.nf, self._pred = 0, {}

    def _feats(self, out, rows: torch.Tensor | None = None) -> torch.Tensor:
        """What the head's catch-up rows read [n, 3 D or D]: the fused or the final-norm features."""
        if self.v3:
            return self.net.fuse(out, rows)
        return out.hidden if rows is None else out.hidden[rows]

    def begin(self, ctx: Context, out) -> None:
        n = out.hidden.shape[0]
        self.feats[:n] = self._feats(out)
        self.nf = n
        self.last_f = out.hidden[-1]
        self.synced = self.pos0 = 1                   # token 0 gets no row: pairs start at (f_0, x_1)

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

    def chain_length(self, ctx: Context) -> int:
        self.control.see(ctx.root, self.last_f)    # the LDLP reads the root and the last final-norm feature
        return super().chain_length(ctx)

    def _track(self, out, rows: list[int]) -> None:
        """Append the features of the pass's rows ``rows`` (committed in this order) to ``feats``."""
        idx = torch.as_tensor(rows, dtype=torch.long, device=out.hidden.device)
        n = int(idx.numel())
        self.feats[self.nf:self.nf + n] = self._feats(out, idx)
        self.nf += n
        self.last_f = out.hidden[idx[-1]]

    def observe(self, tree, out, accepted, ctx) -> None:
        if self.log is not None:
            self.log.append((int(tree.tokens[0]), self.last_f.float().cpu(), tree.tokens[1:].tolist(),
                             len(accepted.path) - 1))
        self._track(out, accepted.path)
        super().observe(tree, out, accepted, ctx)

    def watch(self, tree, out, accepted, ctx) -> None:
        self._track(out, accepted.path)            # the next catch-up feeds these tokens with their features

    def extended(self, out, rows, ctx) -> None:
        self._track(out, rows)

    def describe(self) -> dict:
        d = {"method": self.name, "tree": self.shape, "head": self.net.meta.get("source", "draftwise"),
             "head_version": 3 if self.v3 else 1,
             "vocab_subset": None if self.subset is None else self.subset.size}
        if self.control is not None:
            d["length"] = self.control.describe()
        return d


def head_subset(engine, head, vocab_subset: int) -> VocabSubset | None:
    """The vocabulary a head drafts over: an EAGLE-3 head's own draft vocabulary (``vocab_subset`` does
    not apply to it), else the engine's ``vocab_subset`` most frequent tokens (None: all)."""
    V = engine.model.cfg.vocab_size
    if isinstance(head, eagle3.Eagle3Head):
        full = head.ids.numel() == V and bool((head.ids == torch.arange(V)).all())
        return None if full else VocabSubset(head.ids, V)
    return subset_for(engine, vocab_subset, V)


def _factory(engine, head, ldlp, length, tree: str, max_depth: int, threshold: float, max_nodes, width: int, delta,
             vocab_subset: int) -> Eagle:
    from draftwise.parts import model_fingerprint
    from draftwise.policies.budget import OnlineCost
    from draftwise.policies.length import load_ldlp

    model = engine.model
    if head is None:
        raise ConfigError("method 'eagle' needs a draft head: --method-opts '{\"head\": PATH}' (trained by draftwise "
                          "train eagle, or a public EAGLE-1/2/3 head directory), or \"untrained\"")
    if head == "untrained":
        h = untrained_head(model)
    elif head == "untrained-eagle3":
        sub = subset_for(engine, vocab_subset, model.cfg.vocab_size)
        h = eagle3.untrained_head(model, None if sub is None else sub.ids)
    else:
        h = load_head(head, model)
    v3 = isinstance(h, eagle3.Eagle3Head)
    ctl = None
    if tree == "chain":
        # without an LDLP, one token per step: with the heads trained here it beat DDD and the cost-aware
        # Thompson controls on HumanEval and MT-Bench (docs/results.md), which fell below plain decoding in chat
        length = length or ("ldlp-ddd" if ldlp else "fixed:1")
        lp = None
        if ldlp is not None:
            params, _ = load_ldlp(ldlp, model_fingerprint(model), h.id)
            lp = (params, model.embed)
        costs = None
        if length in ("beta-ts", "calibration-ts"):
            full = engine.cost_curve()
            t1 = float(full.t(1))
            k = h.ids.numel() if v3 else min(vocab_subset or model.cfg.vocab_size, model.cfg.vocab_size)
            frac = 1.0 / model.cfg.num_layers + 0.3 * k / model.cfg.vocab_size   # one layer + the (subset) head,
            # as a share of a target pass
            costs = StepCosts(OnlineCost(full), draft_ms=t1 * frac, plain_ms=0.0)
        ctl = parse_length(length, costs, max_depth, lp, threshold)
    elif length is not None or ldlp is not None:
        raise ConfigError(f"eagle options 'length' and 'ldlp' need tree 'chain', got {tree!r}")
    sub = head_subset(engine, h, vocab_subset)
    return Eagle(h, ctl, tree=tree, max_nodes=max_nodes, max_depth=max_depth, width=width, delta=delta, subset=sub)


SPEC = MethodSpec(
    "eagle", "EAGLE-style draft head on the target's features, AdaEAGLE draft-length prediction "
    "(arXiv 2401.15077, 2412.18910)", _factory,
    options={
        "head": Option(str, None, "draft head (draftwise train eagle [--arch eagle3], or a public EAGLE-1/2/3 "
                               "head directory); \"untrained\": EAGLE-1's training starting point; "
                               "\"untrained-eagle3\": a random EAGLE-3 head (tests)", optional=True,
                               path=True, words=("untrained", "untrained-eagle3")),
        "ldlp": Option(str, None, "draft-length predictor (draftwise train ldlp)", optional=True, path=True),
        "length": Option(str, None, f"chain length: {LENGTHS} (null: ldlp-ddd with an LDLP, else fixed:1)",
                                 optional=True),
        "tree": Option(str, "chain", "chain | static | opt-tree (trees: deterministic top-n children)",
                               choices=("chain", "static", "opt-tree")),
        "max_depth": Option(int, 8, "most draft tokens per step (tree: deepest layer)", lo=1, hi=32),
        "threshold": Option(float, -0.6, "ddd / ldlp-ddd: least cumulative draft log-probability",
                                    lo=-100.0, hi=0.0),
        "max_nodes": Option(int, None, "trees: draft nodes verified per step", optional=True, lo=1, hi=256),
        "width": Option(int, 8, "opt-tree: candidates kept per layer", lo=1, hi=64),
        "delta": Option(float, None, "opt-tree: grow while a layer raises E by more", optional=True,
                                lo=0.0, hi=64.0),
        "vocab_subset": VOCAB_SUBSET,
    },
    check=lambda o: check_name(o["length"], LENGTHS, "eagle option 'length'", o["max_depth"]),
    renamed={"k_max": "max_depth"},
    test_opts=[{"head": "untrained", "length": "fixed:3", "vocab_subset": 0},
               {"head": "untrained", "length": "ddd", "threshold": -1.5, "max_depth": 5, "vocab_subset": 0},
               {"head": "untrained", "length": "beta-ts", "max_depth": 4, "vocab_subset": 0},
               {"head": "untrained", "tree": "opt-tree", "max_nodes": 5, "width": 3, "max_depth": 4, "vocab_subset": 0},
               {"head": "untrained-eagle3", "length": "fixed:3", "vocab_subset": 0},
               {"head": "untrained-eagle3", "tree": "opt-tree", "max_nodes": 5, "width": 3, "max_depth": 4,
                "vocab_subset": 0}])
