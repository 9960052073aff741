"""EAGLE-3 draft heads (arXiv 2503.01840): the head, its checkpoint layout, loading and export.
The drafter that runs a head is ``eagle`` (drafters/eagle.py); this file knows the EAGLE-3 head.

Terms
- aux layers: the three target layers whose outputs the head reads, low / middle / high: the
  outputs of layers (1, L//2 - 1, L - 4) of an L-layer target, i.e. the inputs of layers
  (2, L//2, L - 3), which is what EAGLE-3's reference code and vLLM take (vLLM's
  ``eagle_aux_hidden_state_layer_ids`` name the layers whose *input* is taken; so do our configs).
- fused feature g_i = [h_low ⊕ h_mid ⊕ h_high] of position i [3 D_t]; ``fc`` maps it to the head's
  width D (no bias).
- midlayer: one decoder layer whose residual stream is x (fc(g) on rows of committed tokens, the
  head's own previous output on drafted rows) and whose attention reads
  [input_layernorm(embedding of the row's token) ⊕ hidden_norm(x)] (2 D wide q/k/v inputs).
- readout: lm_head(norm(h)) over the draft vocabulary (K tokens); draft id j is target id
  j + d2t[j]; t2d [V] marks the target ids in the draft vocabulary. The head's output h (before
  ``norm``) is the x of the next drafted row: no fc on drafted rows.
- rows pair like EAGLE-1's: row j pairs the feature of position j - 1 with token x_j, at position j.

Layout (the official one, which vLLM, SGLang and llama.cpp load): ``fc.weight`` [D, 3 D_t],
``midlayer.{input_layernorm,hidden_norm,post_attention_layernorm}.weight`` [D],
``midlayer.self_attn.{q,k,v}_proj.weight`` [*, 2 D] (biases when ``attention_bias``),
``midlayer.self_attn.o_proj.weight``, ``midlayer.mlp.{gate,up,down}_proj.weight``, ``norm.weight``,
``lm_head.weight`` [K, D], ``d2t`` [K] int64, ``t2d`` [V] bool, optionally ``embed_tokens.weight``;
config.json with ``architectures: [LlamaForCausalLMEagle3]``, ``draft_vocab_size``,
``target_hidden_size`` and ``eagle_config.eagle_aux_hidden_state_layer_ids``. Heads trained here
are stored in that layout (plus draftwise metadata) and ``export_head`` writes a directory any of
those engines reads.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import torch

from draftwise.errors import CheckpointError
from draftwise.models.cache import KVCache
from draftwise.models.layers import Linear, attn_mask, build_layer, layer_forward, rms_norm, rope_tables
from draftwise.models.layout import LINEARS, QKV
from draftwise.models.transformer import Transformer

MP = "midlayer."                         # the head's layer prefix (EAGLE-3 layout)
ARCH = "LlamaForCausalLMEagle3"


def q8_linears(target: Transformer, tensors: dict[str, torch.Tensor], names: list[str]) -> dict | None:
    """On the GGUF path (the target's linears are blocks with 8-bit activations) a head's linears
    run the same way: its fp32 weights quantized to Q8_0 once at load (a quarter of the bytes to
    stream per draft step); None elsewhere (fp32, GPUs)."""
    if getattr(target, "weights", None) != "gguf" or target.device.type != "cpu":
        return None
    from draftwise.quant import quantize_q8_0

    return {n: quantize_q8_0(tensors[n]) for n in names if n in tensors and tensors[n].shape[1] % 32 == 0}


def head_linear(weight: torch.Tensor, quant: dict | None, name: str, packed: bool, bias: torch.Tensor | None = None):
    """One head linear: Q8_0 blocks when ``quant`` holds it, else fp32 (packed on CPU)."""
    if quant is not None and name in quant:
        from draftwise.models.layers import QLinear

        return QLinear(quant[name], bias, act="q8")
    return Linear(weight, bias, packed)


def aux_layers(num_layers: int) -> tuple[int, int, int]:
    """Outputs of these target layers make the fused feature (low, middle, high); a target of fewer
    than 5 layers (test models) gives (0, L//2, L - 1)."""
    if num_layers < 5:
        return (0, num_layers // 2, num_layers - 1)
    return (1, num_layers // 2 - 1, num_layers - 4)


def is_eagle3(tensors: dict) -> bool:
    return any(k.startswith(MP) for k in tensors) or "d2t" in tensors


def head_config(target_cfg, hidden_size: int | None = None, **over):
    """The midlayer's config: the target's attention shape unless the checkpoint says otherwise."""
    return dataclasses.replace(target_cfg, hidden_size=hidden_size or target_cfg.hidden_size, qk_norm=False, **over)


def tensor_shapes(cfg, target_hidden: int, draft_vocab: int) -> dict[str, tuple[int, ...]]:
    D, q, kv, inter = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
    s = {"fc.weight": (D, 3 * target_hidden), "norm.weight": (D,), "lm_head.weight": (draft_vocab, D),
         "d2t": (draft_vocab,), "t2d": (cfg.vocab_size,),
         MP + "input_layernorm.weight": (D,), MP + "hidden_norm.weight": (D,),
         MP + "post_attention_layernorm.weight": (D,),
         MP + "self_attn.q_proj.weight": (q, 2 * D), MP + "self_attn.k_proj.weight": (kv, 2 * D),
         MP + "self_attn.v_proj.weight": (kv, 2 * D), MP + "self_attn.o_proj.weight": (D, q),
         MP + "mlp.gate_proj.weight": (inter, D), MP + "mlp.up_proj.weight": (inter, D),
         MP + "mlp.down_proj.weight": (D, inter)}
    if cfg.attention_bias:
        s.update({MP + "self_attn.q_proj.bias": (q,), MP + "self_attn.k_proj.bias": (kv,),
                  MP + "self_attn.v_proj.bias": (kv,)})
    return s


def draft_ids(d2t: torch.Tensor, t2d: torch.Tensor | None, vocab_size: int, where: str) -> torch.Tensor:
    """The target id of each draft-vocabulary row (j + d2t[j]) [K], checked against t2d."""
    ids = torch.arange(d2t.numel()) + d2t.long().cpu()
    if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
        raise CheckpointError(f"{where}: d2t maps draft ids outside the target's vocabulary of {vocab_size}")
    if torch.unique(ids).numel() != ids.numel():
        raise CheckpointError(f"{where}: d2t maps two draft ids to one target id")
    if t2d is not None:
        t2d = t2d.bool().cpu()
        if int(t2d.sum()) != ids.numel() or not bool(t2d[ids].all()):
            raise CheckpointError(f"{where}: t2d and d2t disagree on the draft vocabulary")
    return ids


class Readout:
    """lm_head(norm(h)) over the draft vocabulary [n, K]; ``rows(target ids)`` keeps the rows of
    those target ids (what a vocabulary subset asks of a head). ``rows_of(target ids) -> linear``
    builds the linear: the head's own weight, or, for a head whose LM head is a frozen copy of the
    target's rows (trained here), the target's own LM head rows in the target's weight format."""

    def __init__(self, norm: torch.Tensor, ids: torch.Tensor, eps: float, rows_of):
        self.norm, self.ids, self.eps, self.rows_of = norm, ids, eps, rows_of
        self.lin = rows_of(ids)

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        return self.lin(rms_norm(h, self.norm, self.eps).contiguous())

    def rows(self, target_ids: torch.Tensor) -> "Readout":
        have = set(self.ids.tolist())
        missing = [int(t) for t in target_ids.tolist() if int(t) not in have]
        if missing:
            raise CheckpointError(f"target ids {missing[:3]} are outside this EAGLE-3 head's draft vocabulary")
        return Readout(self.norm, target_ids.cpu(), self.eps, self.rows_of)


class Eagle3Head:
    """fc over the fused feature (rows of committed tokens) or the head's own output (drafted rows) ->
    one midlayer -> h [n, D]; ``lm_head`` reads h out over the draft vocabulary."""

    version = 3

    def __init__(self, target: Transformer, tensors: dict[str, torch.Tensor], cfg, aux: tuple[int, int, int],
                 meta: dict | None = None, packed: bool | None = None):
        packed = target.fast if packed is None else packed
        dev, dt = target.device, target.dtype
        self.target, self.cfg, self.aux, self.meta = target, cfg, tuple(aux), dict(meta or {})
        self.device, self.dtype, self.max_len = dev, dt, target.max_len
        self.D = cfg.hidden_size
        g = lambda n, required=True: tensors[n].to(device=dev, dtype=dt)       # noqa: E731
        quant = q8_linears(target, tensors, ["fc.weight", "lm_head.weight"] +
                           [MP + n + ".weight" for n in LINEARS])
        self.fc = head_linear(g("fc.weight"), quant, "fc.weight", packed)
        self.layer = build_layer(cfg, g, MP, packed, input_norm=False, quant=quant)
        self.in_norm, self.hidden_norm = g(MP + "input_layernorm.weight"), g(MP + "hidden_norm.weight")
        emb = tensors.get("embed_tokens.weight")
        self.embed = target.embed if emb is None else emb.to(dev, dt)
        self.ids = draft_ids(tensors["d2t"], tensors.get("t2d"), cfg.vocab_size, "EAGLE-3 head")
        if self.meta.get("lm_head") == "target-rows":
            rows_of = lambda t: target.lm_head.rows(t.to(dev))                        # noqa: E731
        else:
            full = head_linear(g("lm_head.weight"), quant, "lm_head.weight", packed)
            pos = {int(t): j for j, t in enumerate(self.ids.tolist())}
            rows_of = lambda t: full.rows(torch.tensor([pos[int(i)] for i in t.tolist()]))   # noqa: E731
        self.lm_head = Readout(g("norm.weight"), self.ids, cfg.rms_norm_eps, rows_of)
        self.cos, self.sin = rope_tables(cfg, self.max_len + 64, dev, dt)
        self.id = self.meta.get("head_id") or hashlib.sha256(
            tensors["fc.weight"].detach().float().cpu().numpy().tobytes()).hexdigest()[:16]

    def fuse(self, out, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The fused feature [n, 3 D_t] of a target forward result (of its ``rows`` only, when given)."""
        return torch.cat([out.layer_hidden[i] if rows is None else out.layer_hidden[i][rows] for i in self.aux], -1)

    def new_cache(self, max_len: int) -> KVCache:
        c = self.cfg
        return KVCache(1, c.num_kv_heads, max_len, c.head_dim, self.dtype, self.device)

    def forward(self, tokens: torch.Tensor, feats: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                tree_mask: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [n], feats [n, 3 D_t] (fused target features) or [n, D] (the head's own outputs),
        positions [n] -> h [n, D]; rows are written at cache.end (neither committed nor held)."""
        n, eps = int(tokens.shape[0]), self.cfg.rms_norm_eps
        start = cache.reserve(n)
        x = feats.to(self.dtype)
        if x.shape[-1] != self.D:
            x = self.fc(x.contiguous())
        a = torch.cat([rms_norm(self.embed[tokens], self.in_norm, eps), rms_norm(x, self.hidden_norm, eps)], -1)
        mask = attn_mask(self.cfg, n, cache.length, cache.pending, tree_mask, self.device, self.dtype)
        cos, sin = self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)
        return layer_forward(self.cfg, self.layer, x, cos, sin, lambda k, v: cache.write(0, k, v, start), mask,
                             self.target.glue, attn_in=a.contiguous())


# ---------------------------------------------------------------------- checkpoints
def from_tensors(model: Transformer, tensors: dict[str, torch.Tensor], cfg, aux, meta: dict, where: str,
                 packed: bool | None = None) -> Eagle3Head:
    """Check every tensor's presence and shape (one-line errors), then build the head."""
    K = tensors["d2t"].numel() if "d2t" in tensors else None
    if K is None:
        raise CheckpointError(f"{where} has no d2t (an EAGLE-3 head maps its draft vocabulary with d2t/t2d)")
    if "t2d" in tensors and tensors["t2d"].numel() != model.cfg.vocab_size:
        raise CheckpointError(f"{where}: t2d covers {tensors['t2d'].numel()} tokens, the target has "
                              f"{model.cfg.vocab_size} (a head for another model?)")
    want = tensor_shapes(cfg, model.cfg.hidden_size, K)
    missing = [k for k in want if k not in tensors and k != "t2d"]
    if missing:
        raise CheckpointError(f"{where} is missing tensors {missing[:3]} (EAGLE-3 layout: fc, midlayer.*, norm, "
                              f"lm_head, d2t)")
    for k, shape in want.items():
        if k in tensors and tuple(tensors[k].shape) != shape:
            raise CheckpointError(f"{where}: {k} has shape {tuple(tensors[k].shape)}, this target needs {shape} "
                                  f"(a head for another model?)")
    emb = tensors.get("embed_tokens.weight")
    if emb is not None and tuple(emb.shape) != (model.cfg.vocab_size, cfg.hidden_size):
        raise CheckpointError(f"{where}: embed_tokens has shape {tuple(emb.shape)}, this target needs "
                              f"{(model.cfg.vocab_size, cfg.hidden_size)}")
    if cfg.hidden_size != model.cfg.hidden_size and emb is None:
        raise CheckpointError(f"{where}: the head is {cfg.hidden_size} wide, the target {model.cfg.hidden_size}, "
                              f"and the head has no embed_tokens of its own")
    if max(aux) >= model.cfg.num_layers or min(aux) < 0:
        raise CheckpointError(f"{where} reads target layers {list(aux)}; the target has {model.cfg.num_layers}")
    return Eagle3Head(model, tensors, cfg, aux, meta, packed)


def config_of(model: Transformer, c: dict, where: str):
    """(midlayer config, aux layers) from a public head's config.json, checked against the target."""
    mc = model.cfg
    if c.get("num_hidden_layers", 1) != 1:
        raise CheckpointError(f"EAGLE-3 head {where} has {c['num_hidden_layers']} layers; draftwise runs one")
    for key, have in (("vocab_size", mc.vocab_size), ("target_hidden_size", mc.hidden_size)):
        if key in c and c[key] is not None and c[key] != have:
            raise CheckpointError(f"EAGLE-3 head {where} has {key} {c[key]}, the target has {have}")
    scaling = c.get("rope_scaling")
    if isinstance(scaling, dict) and scaling.get("rope_type", scaling.get("type")) == "default":
        scaling = None
    try:
        H = int(c.get("num_attention_heads", mc.num_heads))
        D = int(c.get("hidden_size", mc.hidden_size))
        cfg = head_config(mc, D, num_heads=H, num_kv_heads=int(c.get("num_key_value_heads", H)),
                          head_dim=int(c.get("head_dim") or D // H),
                          intermediate_size=int(c.get("intermediate_size", mc.intermediate_size)),
                          rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),        # LlamaConfig's defaults
                          rope_theta=float(c.get("rope_theta", 10000.0)), rope_scaling=scaling,
                          attention_bias=bool(c.get("attention_bias", False)))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"EAGLE-3 head {where} has an invalid config field ({e})") from None
    ids = (c.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
    if ids is None:
        aux = aux_layers(mc.num_layers)
    else:
        if len(ids) != 3 or min(ids) < 1:
            raise CheckpointError(f"EAGLE-3 head {where}: eagle_aux_hidden_state_layer_ids {ids} must name three "
                                  f"layers >= 1")
        aux = tuple(int(i) - 1 for i in ids)            # the input of layer i = the output of layer i - 1
    return cfg, aux


def load_public(model: Transformer, tensors: dict[str, torch.Tensor], config: dict | None, where: str,
                packed: bool | None = None) -> Eagle3Head:
    """A public EAGLE-3 head (official layout, config.json beside it)."""
    if config is None:
        cfg, aux = head_config(model.cfg, attention_bias=MP + "self_attn.q_proj.bias" in tensors), \
            aux_layers(model.cfg.num_layers)
    else:
        cfg, aux = config_of(model, config, where)
    return from_tensors(model, tensors, cfg, aux, {"source": "eagle3", "path": where}, where, packed)


def load_ours(model: Transformer, tensors: dict[str, torch.Tensor], meta: dict, where: str,
              packed: bool | None = None) -> Eagle3Head:
    cfg = head_config(model.cfg, attention_bias=MP + "self_attn.q_proj.bias" in tensors)
    aux = tuple(meta.get("aux_layers") or aux_layers(model.cfg.num_layers))
    return from_tensors(model, tensors, cfg, aux, meta, where, packed)


def config_json(model_cfg, head_cfg, aux, draft_vocab: int) -> dict:
    """config.json of an exported head (what vLLM / SGLang / llama.cpp read)."""
    return {"architectures": [ARCH], "model_type": "llama", "hidden_size": head_cfg.hidden_size,
            "intermediate_size": head_cfg.intermediate_size, "num_attention_heads": head_cfg.num_heads,
            "num_key_value_heads": head_cfg.num_kv_heads, "head_dim": head_cfg.head_dim, "num_hidden_layers": 1,
            "rms_norm_eps": head_cfg.rms_norm_eps, "rope_theta": head_cfg.rope_theta,
            "rope_scaling": head_cfg.rope_scaling, "max_position_embeddings": model_cfg.max_position_embeddings,
            "vocab_size": model_cfg.vocab_size, "draft_vocab_size": draft_vocab,
            "target_hidden_size": model_cfg.hidden_size, "attention_bias": head_cfg.attention_bias,
            "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "float32",
            "bos_token_id": model_cfg.bos_token_id,
            "eos_token_id": list(model_cfg.eos_token_ids) if model_cfg.eos_token_ids else None,
            "eagle_config": {"eagle_aux_hidden_state_layer_ids": [i + 1 for i in aux], "use_aux_hidden_state": True}}


def export_head(model: Transformer, tensors: dict[str, torch.Tensor], meta: dict, out: Path) -> Path:
    """Write a head trained here as an official EAGLE-3 directory (config.json + model.safetensors),
    atomically: a temporary directory renamed into place."""
    import os
    import shutil

    from safetensors.torch import save_file

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{out} exists and is not an empty directory")
    cfg = head_config(model.cfg, attention_bias=MP + "self_attn.q_proj.bias" in tensors)
    aux = tuple(meta.get("aux_layers") or aux_layers(model.cfg.num_layers))
    K = tensors["d2t"].numel()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    w = {k: (v.long() if k == "d2t" else v.bool() if k == "t2d" else v.float()).contiguous() for k, v in tensors.items()}
    save_file(w, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(config_json(model.cfg, cfg, aux, K), indent=2) + "\n")
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
    return out


def init_tensors(state: dict[str, torch.Tensor], cfg, ids: torch.Tensor, head_w: torch.Tensor,
                 init: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A head to train from. ``last``: the midlayer starts as the target's last layer reading only the
    hidden half of its input ([0 | W] on q/k/v), fc passes the high feature through ([0 | 0 | I]),
    norm and lm_head the target's (its rows for the draft vocabulary); ``random``: N(0, 0.02)."""
    from draftwise.models.layout import layer_names

    D, L, V = cfg.hidden_size, cfg.num_layers, cfg.vocab_size
    g = torch.Generator().manual_seed(seed)
    src = f"model.layers.{L - 1}."
    t: dict[str, torch.Tensor] = {}
    for n in layer_names(cfg):
        ref = state[src + n].float()
        if n == "input_layernorm.weight":
            t[MP + "hidden_norm.weight"] = ref.clone() if init == "last" else torch.ones(D)
            t[MP + "input_layernorm.weight"] = torch.ones(D)
            continue
        if init == "last":
            w = ref.clone()
        elif n.endswith("norm.weight"):
            w = torch.ones(ref.shape)
        elif n.endswith(".bias"):
            w = torch.zeros(ref.shape)
        else:
            w = torch.randn(ref.shape, generator=g) * 0.02
        if any(n == q + ".weight" for q in QKV):               # q/k/v read [embedding ⊕ hidden]
            w = torch.cat([torch.zeros_like(w) if init == "last" else torch.randn(w.shape, generator=g) * 0.02, w], 1)
        t[MP + n] = w
    if init == "last":
        t["fc.weight"] = torch.cat([torch.zeros(D, 2 * D), torch.eye(D)], 1)
        t["norm.weight"] = state["model.norm.weight"].float().clone()
    else:
        t["fc.weight"] = torch.randn(D, 3 * D, generator=g) * 0.02
        t["norm.weight"] = torch.ones(D)
    t["lm_head.weight"] = head_w.float().clone()
    t["d2t"] = ids.long() - torch.arange(ids.numel())
    t2d = torch.zeros(V, dtype=torch.bool)
    t2d[ids] = True
    t["t2d"] = t2d
    return t


def untrained_head(model: Transformer, vocab: torch.Tensor | None = None, seed: int = 0) -> Eagle3Head:
    """A random EAGLE-3 head for this target (tests; the registry's lossless runs): fc and the midlayer
    N(0, 0.02), the target's final norm and LM head rows for the draft vocabulary ``vocab`` (all)."""
    from draftwise.models.layout import layer_shapes

    cfg = head_config(model.cfg)
    ids = torch.arange(model.cfg.vocab_size) if vocab is None else vocab.cpu()
    shapes = layer_shapes(model.cfg, f"model.layers.{model.cfg.num_layers - 1}.")    # random init reads shapes only
    t = init_tensors({k: torch.zeros(s) for k, s in shapes.items()}, cfg, ids, lm_head_rows(model, ids), "random", seed)
    t["norm.weight"] = model.norm.float().cpu().clone()
    return Eagle3Head(model, t, cfg, aux_layers(model.cfg.num_layers), {"source": "untrained-eagle3"})


def lm_head_rows(model: Transformer, ids: torch.Tensor) -> torch.Tensor:
    """The target's LM head rows [K, D] in fp32 (identity inputs through its Linear: any weight format)."""
    eye = torch.eye(model.cfg.hidden_size, device=model.device, dtype=model.dtype)
    rows = model.lm_head.rows(ids.to(model.device))
    return rows(eye).float().t().contiguous().cpu()
