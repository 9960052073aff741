"""The building blocks of the decoder, as data and free functions: linears (fp32, packed fp32 or
GGUF blocks), one decoder layer's tensors (``Layer``, built from Hugging Face names by
``build_layer``), RMSNorm, RoPE, the attention mask, attention and the layer forward; and the
result of a forward (``ForwardOut``). The model (``transformer.py``), the static/CUDA-graph path
(``graphs.py``), the EAGLE head and the early-exit layer all run their layers through these.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from draftwise import kernels
from draftwise.errors import CheckpointError, ConfigError
from draftwise.models.config import ModelConfig
from draftwise.models.layout import GATE_UP, QKV


class Linear:
    """y = x W^T + b. On CPU fp32 it runs the prepacked kernel (packed); with ``invariant`` the
    batch-invariant Triton kernel (kernels/invariant.py: each row alike for any n); else F.linear."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, packed: bool, invariant: bool = False):
        self.out_features, self.in_features = weight.shape
        self.packed = kernels.pack_weight(weight) if packed else None
        self.weight = None if packed else weight
        self.bias = (kernels.pad_bias(bias) if packed else bias) if bias is not None else None
        self.invariant = bool(invariant and not packed)
        if self.invariant:
            from draftwise.kernels import invariant as inv
            self.splits = inv.splits_for(self.out_features, self.in_features, weight.device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:   # [n, in] -> [n, out]
        if self.invariant:
            from draftwise.kernels import invariant as inv
            return inv.linear(x, self.weight, self.bias, self.splits)
        if self.packed is not None:
            if torch.compiler.is_compiling():                  # traced: the same kernel as a custom op
                from draftwise.kernels import op
                return op.linear(x, self.packed, self.bias, self.out_features)
            return kernels.linear(x.contiguous(), self.packed, self.bias, self.out_features)
        return F.linear(x, self.weight, self.bias)

    def tensors(self) -> tuple:
        return self.packed, self.weight, self.bias

    def rows(self, ids: torch.Tensor) -> "Linear":
        """A Linear computing only the output rows ``ids`` (a vocabulary-subset LM head)."""
        ids = ids.to((self.packed if self.packed is not None else self.weight).device)
        if self.packed is None:
            w = self.weight[ids]
        else:   # gather rows straight from the packed layout [O/16, in, 16]
            w = self.packed[ids // 16, :, ids % 16]
        bias = None
        if self.bias is not None:
            bias = self.bias[ids]
        return Linear(w.contiguous(), bias, self.packed is not None, self.invariant)


class QLinear:
    """y = x W^T + b with W kept in a GGUF file's quantized blocks (draftwise.quant.QWeight, or a list of them
    stacked along the rows: fused q/k/v, gate/up). act "q8": the activations quantized to 8 bits per block
    and integer block dot products (kernels/q8gemm.c: the model as llama.cpp computes it); act "f32": fp32
    activations and arithmetic on the exact dequantized weights (kernels/qgemm.c). A stack the q8 kernel
    cannot take (another block type, segments not on 16-row panels) runs with "f32"; ``act`` says which.
    Attributes: ``segs`` (kernels.pack_q8 segments) for q8, else kernels.pack_quant's layout."""

    packed = weight = None
    segs = None

    def __init__(self, w, bias: torch.Tensor | None, act: str = "f32"):
        parts = list(w) if isinstance(w, (list, tuple)) else [w]
        self.out_features, self.in_features = sum(p.shape[0] for p in parts), parts[0].shape[1]
        self.bias = kernels.pad_bias(bias) if bias is not None else None
        self.act = "f32"
        if act == "q8":
            self.segs = _q8_segments(parts)
            if self.segs is not None:
                self.act, self.group, self._plan = "q8", None, None
                self.kind = "+".join(s.kind for s in self.segs)
                return
        from draftwise.quant import concat_rows

        w = concat_rows(parts) if len(parts) > 1 else parts[0]
        self.group, self.kind = w.group, w.kind
        self.__dict__.update(vars(kernels.pack_quant(w)))    # Q, bits, fmt, S, SC, M, MC, per

    def plan(self):
        """The q8 kernel's C description of this linear (rebuilt after its tensors move: ``replan``)."""
        if self._plan is None:
            self._plan = kernels.q8_plan(self.segs, self.bias)
        return self._plan

    def replan(self) -> None:
        if self.segs is not None:
            self._plan = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:   # [n, in] -> [n, out]
        if self.segs is not None:
            return kernels.q8linear(x.contiguous(), self.plan())
        return kernels.qlinear(x.contiguous(), self, self.group, self.bias, self.out_features)

    def tensors(self) -> tuple:
        if self.segs is not None:
            return tuple(t for s in self.segs for t in (s.U, s.SC, s.MN, s.D, s.M)) + (self.bias,)
        return self.Q, self.S, self.SC, self.M, self.MC, self.bias

    def rows(self, ids: torch.Tensor) -> "QLinear":
        """A QLinear computing only the output rows ``ids`` (a vocabulary-subset LM head)."""
        bias = None if self.bias is None else self.bias[ids.to(self.bias.device)]
        if self.segs is not None:
            if len(self.segs) != 1:
                raise ConfigError("a row subset of a stacked q8 linear is not supported")
            return QLinear(kernels.unpack_q8(self.segs[0], ids.to(self.segs[0].U.device)), bias, act="q8")
        ids = ids.to(self.Q.device)
        return QLinear(kernels.unpack_quant(self, ids), bias)


def _q8_segments(parts: list) -> list | None:
    """pack_q8 segments of stacked QWeights (consecutive parts of one block type share a segment), or None
    where the q8 kernel cannot take them."""
    from draftwise.quant import concat_rows

    runs: list[list] = []
    for p in parts:
        spec = kernels.Q8_KINDS.get(p.kind)
        if spec is None or p.shape[1] % spec[3] or p.group != spec[2] or \
                (spec[3] == 256 and (p.scale_f is None or (spec[4] == 2 and p.offset_f is None))):
            return None                 # not a GGUF block type as the file holds it
        if runs and runs[-1][0].kind == p.kind:
            runs[-1].append(p)
        else:
            runs.append([p])
    if len(runs) > kernels.MAX_Q8_SEGMENTS or any(sum(p.shape[0] for p in r) % 16 for r in runs[:-1]):
        return None
    return [kernels.pack_q8(concat_rows(r) if len(r) > 1 else r[0]) for r in runs]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, weight.shape, weight, eps)


def rope_tables(cfg: ModelConfig, max_len: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [max_len, head_dim] as Hugging Face computes them (fp32, then cast)."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    sc = cfg.rope_scaling
    if sc:
        kind = sc.get("rope_type", sc.get("type"))
        if kind == "linear":
            inv_freq = inv_freq / float(sc["factor"])
        elif kind == "llama3":
            factor, lo, hi = float(sc["factor"]), float(sc["low_freq_factor"]), float(sc["high_freq_factor"])
            old = float(sc["original_max_position_embeddings"])
            wavelen = 2 * math.pi / inv_freq
            scaled = torch.where(wavelen > old / lo, inv_freq / factor, inv_freq)
            smooth = (old / wavelen - lo) / (hi - lo)
            mid = (1 - smooth) * scaled / factor + smooth * scaled
            is_mid = ~(wavelen < old / hi) & ~(wavelen > old / lo)
            inv_freq = torch.where(is_mid, mid, scaled)
        else:
            raise CheckpointError(f"rope scaling type {kind!r} is not supported (supported: linear, llama3)")
    t = torch.arange(max_len, dtype=torch.int64).float()
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(device=device, dtype=dtype), emb.sin().to(device=device, dtype=dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [n, H, D]; cos/sin [n, 1, D]."""
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rot * sin


@dataclass
class Layer:
    attn_norm: torch.Tensor | None       # None: no input norm (EAGLE-1/2 heads' only layer)
    qkv: Linear
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    o: Linear
    mlp_norm: torch.Tensor
    gate_up: Linear
    down: Linear


@dataclass
class ForwardOut:
    logits: torch.Tensor | None                 # [rows, vocab] (rows = logits_rows or all n)
    hidden: torch.Tensor                        # [n, D]: final-norm hidden (or raw, if end_layer stops early)
    layer_hidden: dict[int, torch.Tensor] = field(default_factory=dict)   # layer i output [n, D]


def attn_mask(cfg: ModelConfig, n: int, committed: int, pending: int, tree_mask: torch.Tensor | None,
              device, dtype) -> torch.Tensor | None:
    """Additive float mask [groups * n, committed + pending + n] shared by all layers.

    tree_mask [n, n] or [n, pending + n] bool (True: new token i may see node j), or None for
    causal order. None when every new token sees everything before it (one token, no mask). Query
    heads that share a KV head are stacked along the query axis (no KV expansion), so the mask is
    repeated once per query head in a group.
    """
    dev = device
    if tree_mask is None:
        if n == 1:
            return None
        tree_mask = torch.ones(n, n, dtype=torch.bool, device=dev).tril_()
    tree_mask = tree_mask.to(dev)
    if tree_mask.shape == (n, n) and pending:
        tree_mask = torch.cat([torch.ones(n, pending, dtype=torch.bool, device=dev), tree_mask], 1)
    if tree_mask.shape != (n, pending + n):
        raise ValueError(f"tree_mask has shape {tuple(tree_mask.shape)}, expected ({n}, {n}) or ({n}, {pending + n})")
    if n == 1 and bool(tree_mask.all()):
        return None
    allowed = torch.cat([torch.ones(n, committed, dtype=torch.bool, device=dev), tree_mask], dim=1)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=dev).masked_fill_(~allowed, float("-inf"))
    return mask.repeat(cfg.num_heads // cfg.num_kv_heads, 1)


def build_layer(cfg: ModelConfig, get, prefix: str, packed: bool, input_norm: bool = True,
                quant: dict | None = None, act: str = "q8", invariant: bool = False) -> Layer:
    """One decoder layer from Hugging Face-named tensors (``get(name, required)``) under ``prefix``
    (``model.layers.{i}.``); q/k/v and gate/up are fused into one Linear each. input_norm False:
    the layer has no input RMSNorm (EAGLE-1/2 draft heads); invariant: linears through the
    batch-invariant kernel."""
    def lin(ws: list[str], bs: list[str] | None = None) -> Linear | QLinear:
        b = torch.cat([get(n) for n in bs], 0) if bs is not None else None
        if quant and all(n in quant for n in ws):
            return QLinear([quant[n] for n in ws], b, act=act)
        w = torch.cat([get(n) for n in ws], 0) if len(ws) > 1 else get(ws[0])
        return Linear(w, b, packed, invariant)

    a = prefix + "self_attn."
    qkv_bias = [prefix + n + ".bias" for n in QKV] if cfg.attention_bias else None
    return Layer(
        attn_norm=get(prefix + "input_layernorm.weight") if input_norm else None,
        qkv=lin([prefix + n + ".weight" for n in QKV], qkv_bias),
        q_norm=get(a + "q_norm.weight") if cfg.qk_norm else None,
        k_norm=get(a + "k_norm.weight") if cfg.qk_norm else None,
        o=lin([a + "o_proj.weight"]),
        mlp_norm=get(prefix + "post_attention_layernorm.weight"),
        gate_up=lin([prefix + n + ".weight" for n in GATE_UP]),
        down=lin([prefix + "mlp.down_proj.weight"]),
    )


def qkv_rope(qkv: torch.Tensor, cos, sin, q_norm, k_norm, heads: tuple[int, int, int], eps: float,
             norm=rms_norm):
    """[n, (H + 2 Hkv) Dh] -> q [n, H, Dh], k [n, Hkv, Dh] (normed by ``norm`` if the model has q/k
    norms, rotated), v."""
    n = qkv.shape[0]
    H, Hkv, Dh = heads
    q, k, v = qkv.split([H * Dh, Hkv * Dh, Hkv * Dh], dim=-1)
    q, k, v = q.view(n, H, Dh), k.view(n, Hkv, Dh), v.view(n, Hkv, Dh)
    if q_norm is not None:
        q = norm(q, q_norm, eps)
        k = norm(k, k_norm, eps)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def add_norm(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add, then RMSNorm: (x + y, norm(x + y))."""
    x = x + y
    return x, rms_norm(x, w, eps)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """[n, 2I] -> silu(gate) * up [n, I]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def native_qkv_rope(qkv: torch.Tensor, cos, sin, q_norm, k_norm, heads: tuple[int, int, int], eps: float):
    """qkv_rope through ops.c: the rotation in place on the fresh qkv output (no q/k norms)."""
    if q_norm is not None:
        return qkv_rope(qkv, cos, sin, q_norm, k_norm, heads, eps)
    n = qkv.shape[0]
    H, Hkv, Dh = heads
    c, s = cos.reshape(n, Dh), sin.reshape(n, Dh)
    kernels.rope_(qkv, 0, H, Dh, c, s)
    kernels.rope_(qkv, H * Dh, Hkv, Dh, c, s)
    q, k, v = qkv.split([H * Dh, Hkv * Dh, Hkv * Dh], dim=-1)
    return q.view(n, H, Dh), k.view(n, Hkv, Dh), v.view(n, Hkv, Dh)


def attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask) -> torch.Tensor:
    """q [n, H, Dh] against keys/values [Hkv, T, Dh] (grouped-query heads), additive mask [g n, T]
    (see attn_mask) or None -> [n, H Dh]."""
    n, H, Dh = q.shape
    Hkv = keys.shape[0]
    g = H // Hkv
    qg = q.view(n, Hkv, g, Dh).permute(1, 2, 0, 3).reshape(1, Hkv, g * n, Dh)    # [1, Hkv, g n, Dh]
    attn = F.scaled_dot_product_attention(qg, keys.unsqueeze(0), values.unsqueeze(0), attn_mask=mask)
    return attn.view(Hkv, g, n, Dh).permute(2, 0, 1, 3).reshape(n, H * Dh)       # [n, H Dh]


def native_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask) -> torch.Tensor:
    """attention through ops.c (each (row, head) on its own, in slot order: a tree node gets the bits of
    the one-token step at its place); ATen where the layout does not fit the kernel."""
    out = kernels.attention(q, keys, values, mask, 1.0 / math.sqrt(q.shape[-1]))
    return attention(q, keys, values, mask) if out is None else out


def keep_mask(mask, n: int):
    """The additive mask as the attention steps take it (every glue but the invariant one)."""
    return mask


@dataclass(frozen=True)
class Glue:
    """A layer's non-matmul steps as free functions: eager (``EAGER``), fused by hand in ops.c
    (``NATIVE``, CPU fp32 with the kernels), fused by ``torch.compile`` (:func:`compiled_glue`), or
    batch-invariant Triton kernels (:func:`invariant_glue`). ``visibility(mask, n)`` turns a forward's
    additive mask into what ``attention`` takes, once per forward."""
    qkv_rope: object = qkv_rope
    add_norm: object = add_norm
    swiglu: object = swiglu
    norm: object = rms_norm
    attention: object = attention
    visibility: object = keep_mask


EAGER = Glue()
NATIVE = Glue(native_qkv_rope, kernels.add_rms_norm, kernels.swiglu, kernels.rms_norm, native_attention)


def invariant_glue() -> Glue:
    """The batch-invariant steps (kernels/invariant.py): RMSNorm (q/k norms too) and attention over
    compacted visible lists in Triton; RoPE and SiLU x up stay elementwise torch ops."""
    from draftwise.kernels import invariant as inv

    def inv_qkv_rope(qkv, cos, sin, q_norm, k_norm, heads, eps):
        return qkv_rope(qkv, cos, sin, q_norm, k_norm, heads, eps, norm=inv.rms_norm)

    return Glue(inv_qkv_rope, inv.add_norm, swiglu, inv.rms_norm, inv.attention, inv.visibility)


def compiled_glue() -> Glue:
    """The glue under torch.compile (inductor, dynamic node counts); compiled on first use per shape."""
    c = lambda f: torch.compile(f, dynamic=True)     # noqa: E731
    return Glue(c(qkv_rope), c(add_norm), c(swiglu), c(rms_norm))


def layer_forward(cfg: ModelConfig, L: Layer, x: torch.Tensor, cos, sin, kv, mask, glue: Glue = EAGER,
                  attn_in: torch.Tensor | None = None) -> torch.Tensor:
    """One decoder layer on x [n, D]. ``kv(k, v)`` takes this pass's keys/values [Hkv, n, Dh] and
    returns every key/value the queries attend to [Hkv, T, Dh] (a cache write, or k, v themselves
    for a cache-free training pass); mask: additive [g n, T] (see attn_mask) or None. attn_in [n, D']:
    what q/k/v read instead of the normed x (an EAGLE-3 head's [normed embedding ⊕ normed hidden])."""
    H, Hkv, Dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    h = attn_in if attn_in is not None else x if L.attn_norm is None else glue.norm(x, L.attn_norm, cfg.rms_norm_eps)
    q, k, v = glue.qkv_rope(L.qkv(h), cos, sin, L.q_norm, L.k_norm, (H, Hkv, Dh), cfg.rms_norm_eps)
    keys, values = kv(k.transpose(0, 1), v.transpose(0, 1))            # [Hkv, T, Dh]
    attn = glue.attention(q, keys, values, mask)                       # [n, H Dh]
    x, h = glue.add_norm(x, L.o(attn), L.mlp_norm, cfg.rms_norm_eps)
    return x + L.down(glue.swiglu(L.gate_up(h)))


def cached_layer(cfg: ModelConfig, L: Layer, x: torch.Tensor, cos, sin, k_all: torch.Tensor, v_all: torch.Tensor,
                 start: int, mask, glue: Glue = EAGER) -> torch.Tensor:
    """layer_forward with its keys/values written to one layer's cache [Hkv, T, Dh] at slots
    [start, start + n): every argument explicit, so one torch.compile serves all layers."""
    def kv(k, v):                                                      # [Hkv, n, Dh] -> [Hkv, start + n, Dh]
        end = start + k.shape[1]
        k_all[:, start:end] = k
        v_all[:, start:end] = v
        return k_all[:, :end], v_all[:, :end]
    return layer_forward(cfg, L, x, cos, sin, kv, mask, glue)
