"""One config-driven decoder for the Llama family (Llama, SmolLM, Qwen2, Qwen3, Mistral).

Checkpoint-compatible with Hugging Face (same config.json and tensor names). A single
``forward`` serves prefill, one-token decoding and tree verification: n new tokens with their
positions and an optional ancestor mask [n, n] are scored against the committed KV prefix in
one pass. Options: logits only for chosen rows, hidden states of chosen layers, running only
layers [start_layer, end_layer) and resuming from given hidden states (early exit, EAGLE).

``graphs`` picks how forwards of up to 128 new tokens run (models/graphs.py): "off" (eager, any
shape), "static" (padded to a node-count bucket with device-side cache indexing, run eagerly: the
CPU tests of the CUDA path), "on" (the same, captured and replayed as CUDA graphs), "auto" ("on"
on CUDA unless DRAFTWISE_GRAPHS says otherwise, else "off"). Prefill and other large passes stay eager.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from draftwise import kernels as native_kernels
from draftwise.errors import CheckpointError, ConfigError
from draftwise.models.cache import KVCache
from draftwise.models.config import ModelConfig
from draftwise.models.graphs import MAX_BUCKET, StaticForward
from draftwise.models.layers import (
    EAGER,
    NATIVE,
    ForwardOut,
    Linear,
    QLinear,
    attn_mask,
    build_layer,
    cached_layer,
    compiled_glue,
    invariant_glue,
    rope_tables,
)

GRAPH_MODES = ("auto", "on", "static", "off")
# which kernels run the layers: "torch" (cuBLAS/SDPA or, on CPU fp32, draftwise's C kernels), "invariant"
# (kernels/invariant.py: every row computed alike for any number of rows, so 16-bit decoding stays
# lossless); "auto" picks invariant on CUDA in 16 bits where Triton is there, else torch
KERNEL_MODES = ("auto", "torch", "invariant")
COMPILE_MODES = ("off", "glue", "layer")
# what the linears compute: "gguf" the GGUF blocks with 8-bit activations (llama.cpp's scheme; the CPU
# default), "gguf-f32" the same blocks with fp32 activations (exactly the dequantized weights), "fp32"
# the checkpoint's fp32 tensors (training, parity tests, GPUs); "auto" picks gguf on CPU where it can.
WEIGHT_MODES = ("auto", "gguf", "gguf-f32", "fp32")     # torch.compile: nothing, the non-matmul steps, whole layers


class Transformer:
    def __init__(self, cfg: ModelConfig, state: dict[str, torch.Tensor], device="cpu",
                 dtype: torch.dtype = torch.float32, max_len: int | None = None, fast: bool = True,
                 graphs: str = "auto", compile: str = "off", quant: dict | None = None, native_ops: bool = True,
                 act: str = "q8", kernels: str = "auto"):
        """quant: Hugging Face name -> draftwise.quant.QWeight for linears kept block-quantized
        (CPU fp32 with the kernels only; see ``from_pretrained(weights="gguf")``); act: their activations,
        "q8" (8-bit, llama.cpp's scheme) or "f32" (exact fp32); kernels: see KERNEL_MODES."""
        self.cfg = cfg
        self.device = torch.device(device)
        self.dtype = dtype
        self.invariant = _invariant(kernels, self.device, dtype)
        if self.invariant and quant:
            raise ConfigError("the invariant kernels take the checkpoint's tensors, not GGUF blocks (weights='fp32')")
        if self.invariant and compile != "off":
            raise ConfigError("the invariant kernels run without torch.compile (compile='off')")
        fast = fast and not self.invariant
        self.max_len = int(max_len or min(cfg.max_position_embeddings, 8192))
        # full attention equals sliding-window attention only while the sequence fits the window
        self.window_capped = bool(cfg.sliding_window and cfg.sliding_window < self.max_len)
        if self.window_capped:
            self.max_len = int(cfg.sliding_window)
        self.fast = bool(fast and self.device.type == "cpu" and dtype == torch.float32 and native_kernels.available())

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
                              f"{'' if native_kernels.available() else '; kernels: ' + str(native_kernels.why_unavailable())})")
        if act not in ("q8", "f32"):
            raise ConfigError(f"act must be q8 or f32, got {act!r}")
        self.weights = ("gguf" if act == "q8" else "gguf-f32") if quant else "fp32"
        self.layers = [build_layer(cfg, get, f"model.layers.{i}.", self.fast, quant=quant, act=act,
                                   invariant=self.invariant) for i in range(cfg.num_layers)]
        self.norm = get("model.norm.weight")
        if quant and "lm_head.weight" in quant:
            self.lm_head = QLinear(quant["lm_head.weight"], None, act=act)
        else:
            head = state.get("lm_head.weight")
            if head is None or cfg.tie_word_embeddings:
                head = state["model.embed_tokens.weight"]
            self.lm_head = Linear(head.to(device=self.device, dtype=dtype), None, self.fast, self.invariant)
        self._arena = self._weights_on_huge_pages() if self.fast else None
        self.cos, self.sin = rope_tables(cfg, self.max_len, self.device, dtype)
        self.graphs = _graph_mode(graphs, self.device)
        self.static = StaticForward(self, capture=self.graphs == "on") if self.graphs in ("on", "static") else None
        self._spare_cache: KVCache | None = None
        if compile not in COMPILE_MODES:
            raise ConfigError(f"compile must be one of {', '.join(COMPILE_MODES)}, got {compile!r}")
        self.compile = compile      # opt-in: measured slower than eager on the 2-core CPU (README)
        self.glue = (invariant_glue() if self.invariant else compiled_glue() if compile == "glue"
                     else NATIVE if self.fast and native_ops else EAGER)
        self._cached_layer = torch.compile(cached_layer, dynamic=True) if compile == "layer" else cached_layer
        # each layer in one native call (kernels/layer.c: the NATIVE glue's kernels in its order), where
        # the layer allows it; built here, after the weights found their final place (huge pages)
        native = self.glue is NATIVE and compile == "off"
        heads = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
        self._plans = [native_kernels.layer_plan(L, heads, cfg.rms_norm_eps) if native else None for L in self.layers]

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
        copies, arena = native_kernels.huge_page_copies([getattr(obj, a) for obj, a in slots])
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
            and native_kernels.available() and kw.get("kernels", "auto") != "invariant"
        if weights in ("gguf", "gguf-f32") or (weights == "auto" and ggufs and usable):
            if not ggufs:
                raise CheckpointError(f"weights={weights!r} needs the model's .gguf file in {path} (none found)")
            from draftwise.models.gguf import load_gguf_linears

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
        mask = self.glue.visibility(self.attn_mask(n, cache.length, cache.pending, tree_mask), n)  # [g n, start+n]
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

    def attn_mask(self, n: int, committed: int, pending: int, tree_mask: torch.Tensor | None) -> torch.Tensor | None:
        """The additive attention mask of n new tokens over this model's cache layout (see ``layers.attn_mask``)."""
        return attn_mask(self.cfg, n, committed, pending, tree_mask, self.device, self.dtype)

    def _layer(self, i: int, x: torch.Tensor, cos, sin, cache: KVCache, start: int, mask) -> torch.Tensor:
        if self._plans[i] is not None:
            return native_kernels.layer(self._plans[i], x, cos, sin, cache.k[i], cache.v[i], start, mask)
        return self._cached_layer(self.cfg, self.layers[i], x, cos, sin, cache.k[i], cache.v[i], start, mask, self.glue)


def _invariant(mode: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a model runs the batch-invariant kernels (see KERNEL_MODES); a one-line error where
    "invariant" is asked for and cannot run."""
    if mode not in KERNEL_MODES:
        raise ConfigError(f"kernels must be one of {', '.join(KERNEL_MODES)}, got {mode!r}")
    if mode == "torch" or (mode == "auto" and (device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16))):
        return False                                   # (no Triton import on the CPU's default path)
    from draftwise.kernels import invariant as inv

    if mode == "invariant":
        inv.check(device, dtype)
        return True
    return inv.why_unavailable(device, dtype) is None


def _graph_mode(mode: str, device: torch.device) -> str:
    """The graph mode a model runs: ``mode``, where "auto" reads ``DRAFTWISE_GRAPHS`` (on, static, off;
    e.g. static to run a test suite through the static path) and otherwise means on for CUDA, off elsewhere."""
    if mode not in GRAPH_MODES:
        raise ConfigError(f"graphs must be one of {', '.join(GRAPH_MODES)}, got {mode!r}")
    if mode == "auto":
        env = os.environ.get("DRAFTWISE_GRAPHS")
        if not env and os.environ.get("DRAFTWISE_NO_GRAPHS"):
            warnings.warn("DRAFTWISE_NO_GRAPHS is now DRAFTWISE_GRAPHS=off; the old name goes in the next release",
                          FutureWarning, stacklevel=3)
            env = "off"
        if env:
            if env not in GRAPH_MODES[1:]:
                raise ConfigError(f"DRAFTWISE_GRAPHS must be one of on, static, off, got {env!r}")
            mode = env if env != "on" or device.type == "cuda" else "static"
        else:
            return "on" if device.type == "cuda" else "off"
    if mode == "on" and device.type != "cuda":
        raise ConfigError(f"graphs='on' needs a CUDA device, the model is on {device.type}")
    return mode


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
