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

from draftwise.drafters.eagle import LP, save_head
from draftwise.errors import ConfigError
from draftwise.models.checkpoint import load_state_dict
from draftwise.models.layers import Layer, build_layer, layer_forward, rms_norm
from draftwise.models.layout import layer_names
from draftwise.models.transformer import Transformer
from draftwise.train.early_exit import subset_head
from draftwise.train.pipeline import ChunkOps, FeatureSpec, fit


class HeadLoss:
    """EAGLE's loss on one teacher-forced chunk: input pairs (f_i, x_{i+1}) for i < S - 1, target
    f_{i+1}: SmoothL1(f̂, f) + ce_weight · cross-entropy of the read-out against the target's
    top-k distribution of token i + 2 (``ChunkOps.soft_ce``). Metric ``agree``: read-out argmax ==
    target argmax (top-1 accuracy)."""

    def __init__(self, model: Transformer, feats, head_w: torch.Tensor, subset_ids: torch.Tensor,
                 params: dict[str, torch.Tensor], input_norm: bool, device, ce_weight: float = 0.1):
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
    model = engine.model
    if init not in ("last", "random"):
        raise ConfigError(f"--init must be last or random, got {init!r}")

    def make(feats, dev):
        state = load_state_dict(engine.path)
        params = {k: v.to(dev) for k, v in init_head(state, model.cfg, init).items()}
        ids, head_w = subset_head(engine, state, vocab_subset)
        loss = HeadLoss(model, feats, head_w, ids, params, input_norm=True, device=dev)
        return params, loss, {"vocab_subset": len(ids)}

    spec = FeatureSpec((model.cfg.num_layers - 1,), topk, seq_len)
    params, info = fit(engine, spec, Path(out), make, {"kind_of": "eagle-1", "init": init}, data=data,
                       max_tokens=max_tokens, max_steps=max_steps, epochs=epochs, batch=batch, lr=lr,
                       features=features, device=device, progress=progress, val_every=val_every,
                       desc="EAGLE head")
    info["head_id"] = hashlib.sha256(params["fc.weight"].detach().float().cpu().numpy().tobytes()).hexdigest()[:16]
    info["dims"] = {"hidden_size": model.cfg.hidden_size, "vocab_size": model.cfg.vocab_size}
    save_head(Path(out), params, info)
    return info
