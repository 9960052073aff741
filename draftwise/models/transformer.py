"""One config-driven decoder for the Llama family (Llama, SmolLM, Qwen2, Qwen3, Mistral).

Checkpoint-compatible with Hugging Face (same config.json and tensor names). A single
``forward`` serves prefill, one-token decoding and tree verification: n new tokens with their
positions and an optional ancestor mask [n, n] are scored against the committed KV prefix in
one pass. Options: logits only for chosen rows, hidden states of chosen layers, running only
layers [start_layer, end_layer) and resuming from given hidden states (early exit, EAGLE).

``graphs`` picks how forwards of up to 128 new tokens run (models/graphs.py): "off" (eager, any
shape), "static" (padded to a node-count bucket with device-side cache indexing, run eagerly: the
CPU tests of the CUDA path), "on" (the same, captured and replayed as CUDA graphs), "auto" ("on"
on CUDA unless DRAFTWISE_NO_GRAPHS is set, else "off"). Prefill and other large passes stay eager.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from draftwise import kernels
from draftwise.errors import CheckpointError, ConfigError
from draftwise.models.cache import KVCache
from draftwise.models.config import ModelConfig
from draftwise.models.graphs import MAX_BUCKET, StaticForward

GRAPH_MODES = ("auto", "on", "static", "off")
COMPILE_MODES = ("off", "glue", "layer")
# what the linears compute: "gguf" the GGUF blocks with 8-bit activations (llama.cpp's scheme; the CPU
# default), "gguf-f32" the same blocks with fp32 activations (exactly the dequantized weights), "fp32"
# the checkpoint's fp32 tensors (training, parity tests, GPUs); "auto" picks gguf on CPU where it can.
WEIGHT_MODES = ("auto", "gguf", "gguf-f32", "fp32")     # torch.compile: nothing, the non-matmul steps, whole layers


class Linear:
    """y = x W^T + b. On CPU fp32 it runs the prepacked kernel; elsewhere F.linear."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, packed: bool):
        self.out_features, self.in_features = weight.shape
        self.packed = kernels.pack_weight(weight) if packed else None
        self.weight = None if packed else weight
        self.bias = (kernels.pad_bias(bias) if packed else bias) if bias is not None else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:   # [n, in] -> [n, out]
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
        return Linear(w.contiguous(), bias, self.packed is not None)


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


class Transformer:
    def __init__(self, cfg: ModelConfig, state: dict[str, torch.Tensor], device="cpu",
                 dtype: torch.dtype = torch.float32, max_len: int | None = None, fast: bool = True,
                 graphs: str = "auto", compile: str = "off", quant: dict | None = None, native_ops: bool = True,
                 act: str = "q8"):
        """quant: Hugging Face name -> draftwise.quant.QWeight for linears kept block-quantized
        (CPU fp32 with the kernels only; see ``from_pretrained(weights="gguf")``); act: their activations,
        "q8" (8-bit, llama.cpp's scheme) or "f32" (exact fp32)."""
        self.cfg = cfg
        self.device = torch.device(device)
        self.dtype = dtype
        self.max_len = int(max_len or min(cfg.max_position_embeddings, 8192))
        # full attention equals sliding-window attention only while the sequence fits the window
        self.window_capped = bool(cfg.sliding_window and cfg.sliding_window < self.max_len)
        if self.window_capped:
            self.max_len = int(cfg.sliding_window)
        self.fast = bool(fast and self.device.type == "cpu" and dtype == torch.float32 and kernels.available())

        def get(name: str, required: bool = True) -> torch.Tensor | None:
            t = state.get(name)
            if t is None:
                if required:
                    raise CheckpointError(f"checkpoint is missing tensor {name!r}")
                return None
            return t.to(device=self.device, dtype=dtype)

        self.embed = get("model.embed_tokens.weight")                 # [V, D]
        if self.embed.shape != (cfg.vocab_size, cfg.hidden_size):
            raise CheckpointError(f"embed_tokens has shape {tuple(self.embed.shape)}, config says "
                                  f"({cfg.vocab_size}, {cfg.hidden_size})")
        if quant and not self.fast:
            raise ConfigError("GGUF block weights need the CPU kernels in float32 (load with weights='fp32' "
                              f"for {self.device.type}/{str(dtype).split('.')[-1]}"
                              f"{'' if kernels.available() else '; kernels: ' + str(kernels.why_unavailable())})")
        if act not in ("q8", "f32"):
            raise ConfigError(f"act must be q8 or f32, got {act!r}")
        self.weights = ("gguf" if act == "q8" else "gguf-f32") if quant else "fp32"
        self.layers = [build_layer(cfg, get, f"model.layers.{i}.", self.fast, quant=quant, act=act)
                       for i in range(cfg.num_layers)]
        self.norm = get("model.norm.weight")
        if quant and "lm_head.weight" in quant:
            self.lm_head = QLinear(quant["lm_head.weight"], None, act=act)
        else:
            head = state.get("lm_head.weight")
            if head is None or cfg.tie_word_embeddings:
                head = state["model.embed_tokens.weight"]
            self.lm_head = Linear(head.to(device=self.device, dtype=dtype), None, self.fast)
        self._arena = self._weights_on_huge_pages() if self.fast else None
        self.cos, self.sin = rope_tables(cfg, self.max_len, self.device, dtype)
        self.graphs = _graph_mode(graphs, self.device)
        self.static = StaticForward(self, capture=self.graphs == "on") if self.graphs in ("on", "static") else None
        self._spare_cache: KVCache | None = None
        if compile not in COMPILE_MODES:
            raise ConfigError(f"compile must be one of {', '.join(COMPILE_MODES)}, got {compile!r}")
        self.compile = compile      # opt-in: measured slower than eager on the 2-core CPU (README)
        self.glue = compiled_glue() if compile == "glue" else NATIVE if self.fast and native_ops else EAGER
        self._cached_layer = torch.compile(cached_layer, dynamic=True) if compile == "layer" else cached_layer
        # each layer in one native call (kernels/layer.c: the NATIVE glue's kernels in its order), where
        # the layer allows it; built here, after the weights found their final place (huge pages)
        native = self.glue is NATIVE and compile == "off"
        heads = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
        self._plans = [kernels.layer_plan(L, heads, cfg.rms_norm_eps) if native else None for L in self.layers]

    def _weights_on_huge_pages(self):
        """Re-home the kernels' streamed weights (prepacked fp32 or quantized blocks) in one mapping
        on transparent huge pages (kernels.huge_page_copies); returns the mapping to keep alive."""
        slots = []
        lins = [self.lm_head] + [lin for L in self.layers for lin in (L.qkv, L.o, L.gate_up, L.down)]
        for lin in lins:
            for obj in [lin] + list(getattr(lin, "segs", None) or ()):
                for attr in ("packed", "Q", "S", "SC", "M", "MC", "U", "MN", "D"):
                    if isinstance(getattr(obj, attr, None), torch.Tensor):
                        slots.append((obj, attr))
        copies, arena = kernels.huge_page_copies([getattr(obj, a) for obj, a in slots])
        for (obj, attr), t in zip(slots, copies):
            setattr(obj, attr, t)
        for lin in lins:
            if isinstance(lin, QLinear):
                lin.replan()
        return arena

    def weight_bytes(self) -> int:
        """Bytes held by the weights (a tied head counted once when it shares the embedding)."""
        seen, total = set(), 0

        def add(t):
            nonlocal total
            if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()

        def add_linear(lin: Linear | QLinear):
            for t in lin.tensors():
                add(t)

        add(self.embed); add(self.norm); add_linear(self.lm_head)
        for layer in self.layers:
            for f in (layer.attn_norm, layer.q_norm, layer.k_norm, layer.mlp_norm):
                add(f)
            for lin in (layer.qkv, layer.o, layer.gate_up, layer.down):
                add_linear(lin)
        return total

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, path: str | Path, device="cpu", dtype=torch.float32, weights: str = "fp32",
                        **kw) -> "Transformer":
        """weights (see WEIGHT_MODES): "fp32" (the checkpoint's tensors), "gguf" (linears kept in the .gguf
        file's own quantized blocks and multiplied as llama.cpp does, activations quantized to 8 bits per
        block), "gguf-f32" (the same blocks with fp32 activations: exactly the fp32 model's weights), or
        "auto" (gguf on CPU fp32 when the file and the kernels are there, else fp32). The gguf modes need
        the .gguf beside config.json, as ``draftwise models install`` leaves it."""
        from draftwise.models.checkpoint import load_config, load_state_dict

        path = Path(path)
        cfg = load_config(path)
        quant = None
        if weights not in WEIGHT_MODES:
            raise ConfigError(f"weights must be one of {', '.join(WEIGHT_MODES)}, got {weights!r}")
        ggufs = sorted(path.glob("*.gguf")) if path.is_dir() else []
        usable = torch.device(device).type == "cpu" and dtype == torch.float32 and kw.get("fast", True) \
            and kernels.available()
        if weights in ("gguf", "gguf-f32") or (weights == "auto" and ggufs and usable):
            if not ggufs:
                raise CheckpointError(f"weights={weights!r} needs the model's .gguf file in {path} (none found)")
            from draftwise.quant import load_gguf_linears

            quant = load_gguf_linears(ggufs[0], cfg)
        act = "f32" if weights == "gguf-f32" else "q8"
        return cls(cfg, load_state_dict(path, skip=set(quant or ())), device=device, dtype=dtype, quant=quant,
                   act=act, **kw)

    def new_cache(self, max_len: int | None = None) -> KVCache:
        c = self.cfg
        spare = MAX_BUCKET if self.static is not None else 0     # scratch for a static forward's padding rows
        return KVCache(c.num_layers, c.num_kv_heads, max_len or self.max_len, c.head_dim, self.dtype, self.device, spare)

    def lend_cache(self) -> KVCache:
        """A full-length cache, reused across calls (``give_back_cache``): keeps buffer addresses,
        so captured graphs stay valid, and spares reallocating the cache for every generation."""
        cache, self._spare_cache = self._spare_cache, None
        return cache if cache is not None else self.new_cache()

    def give_back_cache(self, cache: KVCache) -> None:
        if cache.max_len == self.max_len:
            self._spare_cache = cache

    # ------------------------------------------------------------------ forward
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                tree_mask: torch.Tensor | None = None, logits_rows: torch.Tensor | slice | None = None,
                hidden_layers: tuple[int, ...] = (), start_layer: int = 0, end_layer: int | None = None,
                hidden_in: torch.Tensor | None = None, compute_logits: bool = True) -> ForwardOut:
        """Score n new tokens against the cache (committed + pending rows) in one pass.

        tokens [n] long, positions [n] long. tree_mask [n, n] or [n, pending + n] bool: True
        where the new token i may see node j (its ancestors and itself); an [n, n] mask sees every
        pending row; None means causal order over the new tokens (prefill / chain). Entries are
        written to cache slots [cache.end, cache.end + n) and are neither committed nor held.
        """
        cfg = self.cfg
        n = int(tokens.shape[0]) if hidden_in is None else int(hidden_in.shape[0])
        end_layer = cfg.num_layers if end_layer is None else end_layer
        static = self.static is not None and self.static.supports(n, cache, hidden_in)
        # checked where it costs no device sync; the static path on a GPU trusts positions (the decoding
        # loop derives them from the cache length)
        if (not static or positions.device.type == "cpu") and int(positions.max()) >= self.max_len:
            raise ValueError(f"position {int(positions.max())} exceeds the model's context of {self.max_len}")
        if static:
            return self.static(tokens, positions, cache, tree_mask, logits_rows, hidden_layers, start_layer,
                               end_layer, hidden_in, compute_logits)
        start = cache.reserve(n)
        x = self.embed[tokens] if hidden_in is None else hidden_in.to(self.dtype)   # [n, D]
        mask = self._attn_mask(n, cache.length, cache.pending, tree_mask)            # [g n, start+n] or None
        cos = self.cos[positions].unsqueeze(1)                                       # [n, 1, Dh]
        sin = self.sin[positions].unsqueeze(1)
        out_hidden: dict[int, torch.Tensor] = {}
        for i in range(start_layer, end_layer):
            x = self._layer(i, x, cos, sin, cache, start, mask)
            if i in hidden_layers:
                out_hidden[i] = x
        if end_layer < cfg.num_layers:
            return ForwardOut(None, x, out_hidden)
        h = self.glue.norm(x, self.norm, cfg.rms_norm_eps)                           # [n, D]
        logits = None
        if compute_logits:
            rows = h if logits_rows is None else h[logits_rows]
            logits = self.lm_head(rows)                                              # [rows, V]
        return ForwardOut(logits, h, out_hidden)

    __call__ = forward

    def _attn_mask(self, n: int, committed: int, pending: int, tree_mask: torch.Tensor | None) -> torch.Tensor | None:
        """Additive float mask [groups * n, committed + pending + n] shared by all layers.

        None when every new token sees everything before it (one token, no mask). Query heads
        that share a KV head are stacked along the query axis (no KV expansion), so the mask is
        repeated once per query head in a group.
        """
        dev = self.device
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
        mask = torch.zeros(allowed.shape, dtype=self.dtype, device=dev).masked_fill_(~allowed, float("-inf"))
        return mask.repeat(self.cfg.num_heads // self.cfg.num_kv_heads, 1)

    def _layer(self, i: int, x: torch.Tensor, cos, sin, cache: KVCache, start: int, mask) -> torch.Tensor:
        if self._plans[i] is not None:
            return kernels.layer(self._plans[i], x, cos, sin, cache.k[i], cache.v[i], start, mask)
        return self._cached_layer(self.cfg, self.layers[i], x, cos, sin, cache.k[i], cache.v[i], start, mask, self.glue)


def _graph_mode(mode: str, device: torch.device) -> str:
    if mode not in GRAPH_MODES:
        raise ConfigError(f"graphs must be one of {', '.join(GRAPH_MODES)}, got {mode!r}")
    if mode == "auto":
        env = os.environ.get("DRAFTWISE_GRAPHS")       # e.g. "static": run a test suite through the static path
        if env:
            if env not in GRAPH_MODES[1:]:
                raise ConfigError(f"DRAFTWISE_GRAPHS must be one of on, static, off, got {env!r}")
            mode = env if env != "on" or device.type == "cuda" else "static"
        else:
            return "on" if device.type == "cuda" and not os.environ.get("DRAFTWISE_NO_GRAPHS") else "off"
    if mode == "on" and device.type != "cuda":
        raise ConfigError(f"graphs='on' needs a CUDA device, the model is on {device.type}")
    return mode


def build_layer(cfg: ModelConfig, get, prefix: str, packed: bool, input_norm: bool = True,
                quant: dict | None = None, act: str = "q8") -> Layer:
    """One decoder layer from Hugging Face-named tensors (``get(name, required)``) under ``prefix``
    (``model.layers.{i}.``); q/k/v and gate/up are fused into one Linear each. input_norm False:
    the layer has no input RMSNorm (EAGLE-1/2 draft heads)."""
    def lin(ws: list[str], bs: list[str] | None = None) -> Linear | QLinear:
        b = torch.cat([get(n) for n in bs], 0) if bs is not None else None
        if quant and all(n in quant for n in ws):
            return QLinear([quant[n] for n in ws], b, act=act)
        w = torch.cat([get(n) for n in ws], 0) if len(ws) > 1 else get(ws[0])
        return Linear(w, b, packed)

    a = prefix + "self_attn."
    qkv_bias = [a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias"] if cfg.attention_bias else None
    return Layer(
        attn_norm=get(prefix + "input_layernorm.weight") if input_norm else None,
        qkv=lin([a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"], qkv_bias),
        q_norm=get(a + "q_norm.weight") if cfg.qk_norm else None,
        k_norm=get(a + "k_norm.weight") if cfg.qk_norm else None,
        o=lin([a + "o_proj.weight"]),
        mlp_norm=get(prefix + "post_attention_layernorm.weight"),
        gate_up=lin([prefix + "mlp.gate_proj.weight", prefix + "mlp.up_proj.weight"]),
        down=lin([prefix + "mlp.down_proj.weight"]),
    )


def qkv_rope(qkv: torch.Tensor, cos, sin, q_norm, k_norm, heads: tuple[int, int, int], eps: float):
    """[n, (H + 2 Hkv) Dh] -> q [n, H, Dh], k [n, Hkv, Dh] (normed if the model has q/k norms, rotated), v."""
    n = qkv.shape[0]
    H, Hkv, Dh = heads
    q, k, v = qkv.split([H * Dh, Hkv * Dh, Hkv * Dh], dim=-1)
    q, k, v = q.view(n, H, Dh), k.view(n, Hkv, Dh), v.view(n, Hkv, Dh)
    if q_norm is not None:
        q = rms_norm(q, q_norm, eps)
        k = rms_norm(k, k_norm, eps)
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
    (see Transformer._attn_mask) or None -> [n, H Dh]."""
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


@dataclass(frozen=True)
class Glue:
    """A layer's non-matmul steps as free functions: eager (``EAGER``), fused by hand in ops.c
    (``NATIVE``, CPU fp32 with the kernels), or fused by ``torch.compile`` (:func:`compiled_glue`)."""
    qkv_rope: object = qkv_rope
    add_norm: object = add_norm
    swiglu: object = swiglu
    norm: object = rms_norm
    attention: object = attention


EAGER = Glue()
NATIVE = Glue(native_qkv_rope, kernels.add_rms_norm, kernels.swiglu, kernels.rms_norm, native_attention)


def compiled_glue() -> Glue:
    """The glue under torch.compile (inductor, dynamic node counts); compiled on first use per shape."""
    c = lambda f: torch.compile(f, dynamic=True)     # noqa: E731
    return Glue(c(qkv_rope), c(add_norm), c(swiglu), c(rms_norm))


def layer_forward(cfg: ModelConfig, L: Layer, x: torch.Tensor, cos, sin, kv, mask, glue: Glue = EAGER) -> torch.Tensor:
    """One decoder layer on x [n, D]. ``kv(k, v)`` takes this pass's keys/values [Hkv, n, Dh] and
    returns every key/value the queries attend to [Hkv, T, Dh] (a cache write, or k, v themselves
    for a cache-free training pass); mask: additive [g n, T] (see _attn_mask) or None."""
    H, Hkv, Dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    h = x if L.attn_norm is None else glue.norm(x, L.attn_norm, cfg.rms_norm_eps)
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


# ---------------------------------------------------------------------- free functions
@torch.inference_mode()
def prefill(model: Transformer, cache: KVCache, tokens: torch.Tensor, hidden_layers: tuple[int, ...] = (),
            chunk: int | None = None, interrupt=None) -> ForwardOut | None:
    """Run the prompt [n] through the model, commit it, return logits of the last position
    (and the hidden states of every position).

    chunk: at most this many tokens per forward (a long prompt in pieces; each row sees the same
    prefix either way); interrupt: called between chunks, a truthy return stops there and returns None
    (the cache then holds the chunks already run)."""
    n = int(tokens.shape[0])
    step = n if not chunk else chunk
    outs = []
    for s in range(0, n, step):
        if s and interrupt is not None and interrupt():
            return None
        e = min(n, s + step)
        pos = torch.arange(cache.length, cache.length + e - s, device=model.device)
        rows = slice(e - s - 1, e - s) if e == n else slice(0, 0)
        outs.append(model.forward(tokens[s:e].to(model.device), pos, cache, logits_rows=rows,
                                  hidden_layers=hidden_layers, compute_logits=e == n))
        cache.commit(e - s)
    if len(outs) == 1:
        return outs[0]
    return ForwardOut(outs[-1].logits, torch.cat([o.hidden for o in outs]),
                      {i: torch.cat([o.layer_hidden[i] for o in outs]) for i in outs[-1].layer_hidden})


@torch.inference_mode()
def decode_one(model: Transformer, cache: KVCache, token: int) -> torch.Tensor:
    """One plain decoding step: feed one token, commit it, return its logits [V]."""
    t = torch.tensor([token], device=model.device)
    pos = torch.tensor([cache.length], device=model.device)
    out = model.forward(t, pos, cache)
    cache.commit(1)
    return out.logits[0]
