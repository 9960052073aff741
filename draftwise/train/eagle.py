"""Training an EAGLE head (arXiv 2401.15077) on the target's own features: ``train_head``.

The head (``drafters/eagle.py``) reads [embedding of x_{i+1} ⊕ f_i] and predicts f_{i+1}; here it
learns that map on teacher-forced chunks of training text (SmoothL1 on the feature plus a small
cross-entropy of its read-out), through the shared pipeline (``train/pipeline.py``).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F

from draftwise.drafters import eagle3
from draftwise.drafters.eagle import LP, save_head
from draftwise.errors import ConfigError
from draftwise.models.checkpoint import load_state_dict
from draftwise.models.layers import Layer, build_layer, layer_forward, rms_norm
from draftwise.models.layout import layer_names
from draftwise.models.transformer import Transformer
from draftwise.train.early_exit import subset_head
from draftwise.train.pipeline import ChunkOps, FeatureSpec, fit

ARCHS = ("eagle1", "eagle3")
DEPTHS = 3                 # validation reports top-1 accuracy at draft depths 1..DEPTHS
TTT_DECAY = 0.8            # EAGLE-3: the loss of draft depth j is weighted TTT_DECAY ** (j - 1)


class HeadLoss:
    """The loss of a head on teacher-forced chunks, with EAGLE-3's training-time test.

    Row i of depth 1 pairs the target's feature of position i with token x_{i+1} and predicts
    x_{i+2} (EAGLE-1: f_i, the last layer's final-normed output, through fc over [embedding ⊕ f];
    EAGLE-3: g_i, the fused low/middle/high feature, through fc, with the embedding read by the
    midlayer's attention). Row i of depth j > 1 pairs the head's own output of depth j - 1 at row
    i with the true token x_{i+j} and predicts x_{i+j+1}: what drafting feeds the head from the
    second draft token on. Its query sees the depth-1 rows up to i and its own earlier depths at
    row i only, and sits at position i + j - 1: the attention pattern and positions of a drafted
    chain (``Eagle3Head.forward`` through the KV cache).

    Loss: EAGLE-1 (``steps`` 1): SmoothL1(f̂, f) + ce_weight · cross-entropy of the read-out against
    the target's top-k distribution (``ChunkOps.soft_ce``); EAGLE-3: Σ_j TTT_DECAY^(j-1) · CE_j over
    ``steps`` depths, no feature regression. Metrics: ``agree`` (depth 1), ``agree_d2`` ..: read-out
    argmax == target argmax at each depth up to DEPTHS (without gradients every head is run to
    DEPTHS, so EAGLE-1 heads get depth accuracies too)."""

    def __init__(self, model: Transformer, feats, head_w: torch.Tensor, subset_ids: torch.Tensor,
                 params: dict[str, torch.Tensor], input_norm: bool, device, ce_weight: float = 0.1,
                 arch: str = "eagle1", steps: int = 1, aux: tuple[int, ...] = ()):
        if arch not in ARCHS:
            raise ConfigError(f"--arch must be one of {', '.join(ARCHS)}, got {arch!r}")
        self.model, self.feats, self.params, self.device = model, feats, params, device
        self.input_norm, self.ce_weight, self.arch, self.steps, self.aux = input_norm, ce_weight, arch, steps, aux
        self.key = f"h{model.cfg.num_layers - 1}"
        self.seq = feats.manifest["spec"]["seq_len"]
        self.ops = ChunkOps(model, self.seq, subset_ids, device)
        self.head_w = head_w.to(device)                                          # [K, D] frozen
        self.norm = model.norm.to(device).float()
        self.embed = model.embed if model.embed.device == torch.device(device) else model.embed.to(device)
        self._masks: dict[tuple[int, int], torch.Tensor] = {}
        self.trace: list[torch.Tensor] | None = None    # a list: each depth's logits [n, K] appended (tests)

    def __call__(self, batch: list[tuple[int, int]]) -> tuple[torch.Tensor, dict]:
        v3 = self.arch == "eagle3"
        cfg = eagle3.head_config(self.model.cfg, attention_bias=eagle3.MP + "self_attn.q_proj.bias" in self.params) \
            if v3 else self.model.cfg
        L = build_layer(cfg, lambda n, required=True: self.params[n], eagle3.MP if v3 else LP, packed=False,
                        input_norm=self.input_norm and not v3)
        depths = max(self.steps, DEPTHS) if not torch.is_grad_enabled() else self.steps
        losses, hits, reg, ce = [], [0.0] * depths, 0.0, 0.0
        amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")
        for s, r in batch:
            with amp:
                loss, h, a, b = self._chunk(cfg, L, s, r, depths)
            losses.append(loss)
            hits = [x + y for x, y in zip(hits, h)]
            reg, ce = reg + a, ce + b
        n = len(batch)
        m = {"agree": hits[0] / (n * (self.seq - 1)), "ce": ce / n}
        m.update({f"agree_d{j + 1}": hits[j] / (n * (self.seq - 1 - j)) for j in range(1, depths)})
        if not v3:
            m["reg"] = reg / n
        return torch.stack(losses).mean(), m

    def _mask(self, j: int, n0: int) -> torch.Tensor:
        """Depth j's additive mask [groups * n_j, Σ_m n_m]: depth-1 rows up to i, then row i of each
        later depth (n_m = n0 - m rows at depth m + 1)."""
        if (j, n0) not in self._masks:
            n = n0 - j
            blocks = [torch.ones(n, n0, dtype=torch.bool, device=self.device).tril_()]
            blocks += [torch.eye(n, n0 - m, dtype=torch.bool, device=self.device) for m in range(1, j + 1)]
            allowed = torch.cat(blocks, 1)
            self._masks[(j, n0)] = torch.zeros(allowed.shape, device=self.device) \
                .masked_fill_(~allowed, float("-inf")).repeat(self.ops.groups, 1)
        return self._masks[(j, n0)]

    def _chunk(self, cfg, L: Layer, s: int, r: int, depths: int):
        ops, p, S, eps = self.ops, self.params, self.seq, cfg.rms_norm_eps
        v3 = self.arch == "eagle3"
        get = lambda k: self.feats.get(s, r, k).to(self.device)               # noqa: E731
        toks = get("tokens").long()                                                                # [S]
        top, logp = get("top_ids").long(), get("top_logp").float()                                 # [S, k]
        n0 = S - 1
        if v3:
            x = F.linear(torch.cat([get(f"h{i}").float()[:-1] for i in self.aux], -1), p["fc.weight"])   # [S-1, D]
        else:
            f = rms_norm(get(self.key).float(), self.norm, self.model.cfg.rms_norm_eps)           # [S, D]
            x = f[:-1]
        keys: list[tuple[torch.Tensor, torch.Tensor]] = []

        def kv(k, v):
            keys.append((k, v))
            return torch.cat([a for a, _ in keys], 1), torch.cat([b for _, b in keys], 1)

        total, hits, reg, ce0 = 0.0, [], 0.0, 0.0
        for j in range(depths):
            n = n0 - j
            emb = self.embed[toks[1 + j:1 + j + n]].float()                                      # [n, D]
            x = x[:n]
            if v3:
                a = torch.cat([rms_norm(emb, p[eagle3.MP + "input_layernorm.weight"], eps),
                               rms_norm(x, p[eagle3.MP + "hidden_norm.weight"], eps)], -1)
                z = layer_forward(cfg, L, x, ops.cos[j:j + n], ops.sin[j:j + n], kv, self._mask(j, n0), attn_in=a)
                logits = F.linear(rms_norm(z, p["norm.weight"], eps), self.head_w)
            else:
                h = F.linear(torch.cat([emb, x], -1), p["fc.weight"], p.get("fc.bias"))
                z = layer_forward(cfg, L, h, ops.cos[j:j + n], ops.sin[j:j + n], kv, self._mask(j, n0))
                logits = F.linear(z, self.head_w)
            if self.trace is not None:
                self.trace.append(logits.detach())
            logq = torch.log_softmax(logits.float(), -1)                                         # [n, K]
            c, hit = ops.soft_ce(logq, top[1 + j:1 + j + n], logp[1 + j:1 + j + n])
            hits.append(hit)
            if j == 0:
                ce0 = float(c.detach())
                if not v3:
                    rl = F.smooth_l1_loss(z.float(), f[1:])
                    reg = float(rl.detach())
                    total = rl + self.ce_weight * c
            if v3 and j < self.steps:
                total = total + TTT_DECAY ** j * c
            x = z
        return total, hits, reg, ce0


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
               topk: int = 32, device: str | None = None, progress: bool = True, val_every: int = 0,
               arch: str = "eagle1", ttt: int | None = None) -> dict:
    """Train an EAGLE head for ``engine``'s target and save it to ``out``.

    arch ``eagle1``: reads the last layer's output (final-normed at training time); ``eagle3``: the
    fused outputs of three layers (``eagle3.aux_layers``), training-time test over ``ttt`` draft
    depths (default 3), the draft vocabulary = the ``vocab_subset`` most frequent tokens (d2t/t2d),
    stored in the official EAGLE-3 layout. Teacher features (those layers' outputs and the target's
    top-k log-probabilities) are extracted once into ``features`` (default ``out``.features) and
    reused (a directory holding more layers serves too); ``max_tokens`` bounds them, ``max_steps``
    bounds the run (a smoke run extracts only what its steps need)."""
    model = engine.model
    if init not in ("last", "random"):
        raise ConfigError(f"--init must be last or random, got {init!r}")
    if arch not in ARCHS:
        raise ConfigError(f"--arch must be one of {', '.join(ARCHS)}, got {arch!r}")
    if ttt is not None and not 1 <= ttt <= 8:
        raise ConfigError(f"--ttt must be in 1..8, got {ttt}")
    if ttt is not None and ttt > 1 and arch == "eagle1":
        raise ConfigError("--ttt needs --arch eagle3 (EAGLE-1 trains on its own features only)")
    v3 = arch == "eagle3"
    steps = (ttt or 3) if v3 else 1
    aux = eagle3.aux_layers(model.cfg.num_layers)
    frozen: dict[str, torch.Tensor] = {}

    def make(feats, dev):
        state = load_state_dict(engine.path)
        ids, head_w = subset_head(engine, state, vocab_subset)
        if v3:
            t = eagle3.init_tensors(state, eagle3.head_config(model.cfg), ids, head_w, init)
            frozen.update({k: t.pop(k) for k in ("lm_head.weight", "d2t", "t2d")})
            params = {k: v.to(dev) for k, v in t.items()}
        else:
            params = {k: v.to(dev) for k, v in init_head(state, model.cfg, init).items()}
        loss = HeadLoss(model, feats, head_w, ids, params, input_norm=True, device=dev, arch=arch, steps=steps,
                        aux=aux)
        return params, loss, {"vocab_subset": len(ids)}

    layers = aux if v3 else (model.cfg.num_layers - 1,)
    meta = {"kind_of": "eagle-3" if v3 else "eagle-1", "init": init}
    if v3:
        meta.update({"ttt": steps, "aux_layers": list(aux), "lm_head": "target-rows"})   # a frozen copy
    params, info = fit(engine, FeatureSpec(layers, topk, seq_len), Path(out), make, meta, data=data,
                       max_tokens=max_tokens, max_steps=max_steps, epochs=epochs, batch=batch, lr=lr,
                       features=features, device=device, progress=progress, val_every=val_every,
                       desc="EAGLE-3 head" if v3 else "EAGLE head")
    info["head_id"] = hashlib.sha256(params["fc.weight"].detach().float().cpu().numpy().tobytes()).hexdigest()[:16]
    info["dims"] = {"hidden_size": model.cfg.hidden_size, "vocab_size": model.cfg.vocab_size}
    save_head(Path(out), {**params, **frozen}, info)
    return info
