"""EESD's exit layer (arXiv 2406.03853), trained here by self-distillation: ``train_exit``.

The exit layer (``drafters/early_exit.py``) reads the residual stream after the target's first N
layers; here it learns to match the target's next-token distribution (KL against the target's
top-k on training text) through the shared pipeline (``train/pipeline.py``).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from draftwise.drafters.early_exit import PREFIX, save_exit
from draftwise.errors import ConfigError
from draftwise.models.checkpoint import load_state_dict
from draftwise.models.layers import Layer, build_layer, layer_forward, rms_norm
from draftwise.models.layout import layer_names
from draftwise.models.transformer import Transformer
from draftwise.train.pipeline import ChunkOps, FeatureSpec, fit
from draftwise.vocab import subset_for


def init_tensors(state: dict[str, torch.Tensor], cfg, source: int) -> dict[str, torch.Tensor]:
    """The exit layer's starting point: a copy of target layer ``source`` (float32)."""
    return {PREFIX + k: state[f"model.layers.{source}.{k}"].float().clone() for k in layer_names(cfg)}


class DistillLoss:
    """Cross-entropy of the exit layer's subset distribution against the target's top-k
    distribution (``ChunkOps.soft_ce``); metric ``agree``: draft argmax == target argmax."""

    def __init__(self, model: Transformer, feats, layer: int, head_w: torch.Tensor, subset_ids: torch.Tensor,
                 params: dict[str, torch.Tensor], device):
        self.model, self.feats, self.layer, self.params, self.device = model, feats, layer, params, device
        self.head_w = head_w.to(device)                                    # [K, D] frozen
        self.seq = feats.manifest["spec"]["seq_len"]
        self.ops = ChunkOps(model, self.seq, subset_ids, device)
        self.norm = model.norm.to(device).float()

    def __call__(self, batch: list[tuple[int, int]]) -> tuple[torch.Tensor, dict]:
        L = build_layer(self.model.cfg, lambda n, required=True: self.params[n], PREFIX, packed=False)
        losses, agree = [], 0.0
        amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")
        for s, r in batch:
            with amp:
                loss, hit = self._chunk(L, s, r)
            losses.append(loss)
            agree += hit
        return torch.stack(losses).mean(), {"agree": agree / (len(batch) * self.seq)}

    def _chunk(self, L: Layer, s: int, r: int) -> tuple[torch.Tensor, float]:
        cfg, ops = self.model.cfg, self.ops
        x = self.feats.get(s, r, f"h{self.layer - 1}").to(self.device).float()          # [S, D]
        top = self.feats.get(s, r, "top_ids").to(self.device).long()                    # [S, k]
        logp_t = self.feats.get(s, r, "top_logp").to(self.device).float()               # [S, k]
        z = layer_forward(cfg, L, x, ops.cos, ops.sin, lambda k, v: (k, v), ops.mask(self.seq))
        logq = torch.log_softmax(F.linear(rms_norm(z, self.norm, cfg.rms_norm_eps), self.head_w), -1)  # [S, K]
        return ops.soft_ce(logq, top, logp_t)


def subset_head(engine, state: dict[str, torch.Tensor], vocab_subset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(subset ids [K], the frozen LM head's rows for them [K, D] float32) from a state dict."""
    model = engine.model
    sub = subset_for(engine, vocab_subset, model.cfg.vocab_size)
    ids = sub.ids.cpu() if sub is not None else torch.arange(model.cfg.vocab_size)
    head = state.get("lm_head.weight")
    if head is None or model.cfg.tie_word_embeddings:
        head = state["model.embed_tokens.weight"]
    return ids, head[ids].float()


def train_exit(engine, layer: int, out: Path, data: list[str] | None = None, max_tokens: int = 400_000,
               max_steps: int | None = None, epochs: float = 1.5, batch: int = 4, lr: float = 6e-4,
               init: str = "next", features: Path | None = None, vocab_subset: int = 32768, seq_len: int = 512,
               topk: int = 32, device: str | None = None, progress: bool = True, extra_layers: tuple[int, ...] = (),
               val_every: int = 0) -> dict:
    """Self-distil an exit layer after the target's first ``layer`` layers; save it to ``out``.

    Teacher features (layer ``layer``'s input and the target's top-k log-probabilities) are
    extracted once into ``features`` (default: ``out`` + ``.features``) and reused by later runs.
    init: ``next`` (a copy of target layer N: it already reads layer N's input, the residual
    stream it is given; on the 0.5B at N = 6 it reached 0.295 validation agreement after 60 steps
    against 0.271 from the last layer, benchmarks/results/eesd/sweep.json), ``last`` (a copy of the
    target's last layer, which writes into the space the final norm and head read) or an index.
    """
    model = engine.model
    L = model.cfg.num_layers
    if not 1 <= layer < L:
        raise ConfigError(f"--layer must be in [1, {L - 1}] for {engine.model_id} ({L} layers), got {layer}")
    src = {"last": L - 1, "next": layer}.get(init)
    if src is None:
        try:
            src = int(init)
        except ValueError:
            raise ConfigError(f"--init must be last, next or a layer index, got {init!r}") from None
    if not 0 <= src < L:
        raise ConfigError(f"--init layer {src} is outside the target's {L} layers")
    def make(feats, dev):
        state = load_state_dict(engine.path)
        params = {k: v.to(dev) for k, v in init_tensors(state, model.cfg, src).items()}
        ids, head_w = subset_head(engine, state, vocab_subset)
        return params, DistillLoss(model, feats, layer, head_w, ids, params, dev), {"vocab_subset": len(ids)}

    spec = FeatureSpec(tuple(sorted({layer - 1, *extra_layers})), topk, seq_len)
    params, info = fit(engine, spec, Path(out), make, {"layer": layer, "init": src}, data=data,
                       max_tokens=max_tokens, max_steps=max_steps, epochs=epochs, batch=batch, lr=lr,
                       features=features, device=device, progress=progress, val_every=val_every,
                       desc=f"exit layer after {layer}")
    save_exit(out, params, info)
    return info
