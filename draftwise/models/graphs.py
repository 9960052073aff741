"""Static-shape forwards: node-count buckets, padded trees, device-side cache indexing, CUDA graphs.

On a GPU the eager forward is launch-bound: a decoding step launches hundreds of small kernels
and the host, not the weights, sets its time. A CUDA graph replays them all with one launch, but
only for fixed shapes and fixed addresses, with nothing on the host in between. This module gives
:class:`~draftwise.models.transformer.Transformer` such a forward:

- **bucket B**: the node count a forward is padded up to, one of :data:`BUCKETS`. The n real
  nodes come first; the B - n **dummy nodes** (token 0 at the committed length's position) see
  the committed prefix and themselves, so they stay finite, and their results are dropped.
- **span T**: the cache slots [0, T) the queries attend over, a power of two >= end + B (at
  least :data:`MIN_SPAN`, at most the cache's capacity). A boolean visibility buffer [B, T] says
  which slots each row sees (committed prefix, its tree ancestors among the pending and new rows,
  itself); slots past the sequence are stale or zero and always masked.
- **slots**: the KV rows are written with ``index_copy_`` at end + arange(B) from a device-side
  start, so the real rows land where the eager forward puts them and the dummy rows in the
  scratch slots after them (the cache keeps :data:`MAX_BUCKET` spare slots for this).
- Everything that varies between steps lives in preallocated device buffers, filled before the
  run by copies and fills that need no host synchronisation. Under ``capture=True`` each
  (cache, bucket, span, layer range, outputs) is captured once, lazily, into a CUDA graph that
  shares one memory pool with the others, and replayed from then on; ``capture=False`` runs the
  same static code eagerly (how the CPU tests check padding and bucketing against the plain
  forward, and the GPU's fallback).

The outputs are copies of the real rows, so a caller may keep them across later forwards.
"""
from __future__ import annotations

import time
import warnings
import weakref
from dataclasses import dataclass, field

import torch

from draftwise.models.layers import ForwardOut, layer_forward

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
MAX_BUCKET = BUCKETS[-1]
MIN_SPAN = 256


def bucket(n: int) -> int | None:
    """The smallest bucket holding n nodes, or None past the largest."""
    return next((b for b in BUCKETS if b >= n), None)


def span(end: int, b: int, capacity: int) -> int:
    """Attention span for a forward of bucket b writing from slot ``end``."""
    t = MIN_SPAN
    while t < end + b:
        t *= 2
    return min(t, capacity)


@dataclass
class _Entry:
    """Buffers (and, when captured, the graph) of one static shape."""
    tokens: torch.Tensor                 # [B] long
    positions: torch.Tensor              # [B] long
    start: torch.Tensor                  # [1] long: first slot written (cache end)
    visible: torch.Tensor                # [B, T] bool
    hidden_in: torch.Tensor | None       # [B, D] or None
    outputs: dict = field(default_factory=dict)
    graph: object | None = None
    runs: int = 0


class StaticForward:
    """Static-shape forwards of one model; ``capture`` replays them as CUDA graphs."""

    def __init__(self, model, capture: bool):
        self.model = model
        self.capture = bool(capture)
        self.entries: dict[tuple, _Entry] = {}
        self._caches: dict[int, weakref.ref] = {}
        self._pools: dict[int, tuple] = {}   # one graph memory pool per cache: it goes with that cache's graphs
        self.capture_s = 0.0          # total time spent capturing graphs
        self.captured = 0
        self.failed: str | None = None   # why capture failed (then every shape runs eagerly)
        dev = model.device
        self._ar = torch.arange(MAX_BUCKET, device=dev)                                  # [128]
        self._eye = torch.eye(MAX_BUCKET, dtype=torch.bool, device=dev)                  # [128, 128]
        self._tril = torch.ones(MAX_BUCKET, MAX_BUCKET, dtype=torch.bool, device=dev).tril_()

    # ------------------------------------------------------------------ entry point
    def supports(self, n: int, cache, hidden_in) -> bool:
        b = bucket(n)
        return b is not None and cache.end + b <= cache.capacity and (hidden_in is None or hidden_in.shape[0] == n)

    def __call__(self, tokens, positions, cache, tree_mask, logits_rows, hidden_layers, start_layer, end_layer,
                 hidden_in, compute_logits):
        with torch.inference_mode():     # the buffers are inference tensors, written only in this mode
            o, n = self._forward(tokens, positions, cache, tree_mask, hidden_layers, start_layer, end_layer,
                                 hidden_in, compute_logits)
        hidden = o["hidden"][:n].clone()
        layer_hidden = {i: h[:n].clone() for i, h in o["layers"].items()}
        logits = None
        if o["logits"] is not None:
            logits = o["logits"][:n]
            logits = (logits if logits_rows is None else logits[logits_rows]).clone()
        return ForwardOut(logits, hidden, layer_hidden)

    def _forward(self, tokens, positions, cache, tree_mask, hidden_layers, start_layer, end_layer, hidden_in,
                 compute_logits) -> tuple[dict, int]:
        m = self.model
        n = int(tokens.shape[0]) if hidden_in is None else int(hidden_in.shape[0])
        b = bucket(n)
        end = cache.reserve(n)
        t = span(end, b, cache.capacity)
        logits_on = compute_logits and end_layer >= m.cfg.num_layers
        self._bind(cache)
        key = (id(cache.k), b, t, start_layer, end_layer, tuple(sorted(hidden_layers)), hidden_in is not None, logits_on)
        e = self.entries.get(key)
        if e is None:
            e = self._new_entry(cache, b, t, hidden_in is not None)
            self.entries[key] = e
        self._fill(e, cache, n, b, tokens, positions, tree_mask, hidden_in)
        if e.graph is not None:
            e.graph.replay()
        elif self.capture and e.runs >= 1 and self._capture(e, cache, t, start_layer, end_layer, hidden_layers,
                                                            logits_on):
            e.graph.replay()               # captured on the second use of a shape: one-off shapes stay eager
        else:
            e.outputs = self._run(e, cache, t, start_layer, end_layer, hidden_layers, logits_on)
        e.runs += 1
        return e.outputs, n

    # ------------------------------------------------------------------ pieces
    def _bind(self, cache) -> None:
        """Graphs bake in the cache's addresses: forget the shapes of caches that are gone (a new
        cache can reuse a dead one's id)."""
        cid = id(cache.k)
        ref = self._caches.get(cid)
        if ref is not None and ref() is cache:
            return
        for old, r in list(self._caches.items()):
            if old == cid or r() is None:
                del self._caches[old]
                self._pools.pop(old, None)    # never capture into a pool whose graphs are all gone
                for k in [k for k in self.entries if k[0] == old]:
                    del self.entries[k]
        self._caches[cid] = weakref.ref(cache)
        if self.capture:
            self._pools[cid] = torch.cuda.graph_pool_handle()

    def _new_entry(self, cache, b: int, t: int, with_hidden: bool) -> _Entry:
        m, dev = self.model, self.model.device
        return _Entry(tokens=torch.zeros(b, dtype=torch.long, device=dev),
                      positions=torch.zeros(b, dtype=torch.long, device=dev),
                      start=torch.zeros(1, dtype=torch.long, device=dev),
                      visible=torch.zeros(b, t, dtype=torch.bool, device=dev),
                      hidden_in=torch.zeros(b, m.cfg.hidden_size, dtype=m.dtype, device=dev) if with_hidden else None)

    def _fill(self, e: _Entry, cache, n: int, b: int, tokens, positions, tree_mask, hidden_in) -> None:
        """Copy this step's inputs into the entry's buffers (device-side, no host sync)."""
        L, P = cache.length, cache.pending
        end = L + P
        if hidden_in is None:
            e.tokens[:n].copy_(tokens, non_blocking=True)
            e.tokens[n:].zero_()
        else:
            e.hidden_in[:n].copy_(hidden_in, non_blocking=True)
            e.hidden_in[n:].zero_()
        e.positions[:n].copy_(positions, non_blocking=True)
        e.positions[n:].fill_(L)
        e.start.fill_(end)
        vis = e.visible
        vis.zero_()
        vis[:, :L] = True
        if tree_mask is None:          # causal over the new rows, every pending row visible
            tree_mask = self._tril[:n, :n]
        tree_mask = tree_mask.to(vis.device)
        if tree_mask.shape == (n, n):
            vis[:n, L:end] = True
            vis[:n, end:end + n] = tree_mask
        elif tree_mask.shape == (n, P + n):
            vis[:n, L:end + n] = tree_mask
        else:
            raise ValueError(f"tree_mask has shape {tuple(tree_mask.shape)}, expected ({n}, {n}) or ({n}, {P + n})")
        if b > n:
            vis[n:, end + n:end + b] = self._eye[:b - n, :b - n]

    def _run(self, e: _Entry, cache, t: int, start_layer: int, end_layer: int, hidden_layers, logits_on: bool) -> dict:
        """The static forward itself: fixed shapes, device-side indexing only."""
        m = self.model
        cfg = m.cfg
        b = e.tokens.shape[0]
        slots = self._ar[:b] + e.start                                            # [B]
        x = m.embed[e.tokens] if e.hidden_in is None else e.hidden_in             # [B, D]
        mask = torch.zeros(e.visible.shape, dtype=m.dtype, device=m.device).masked_fill_(~e.visible, float("-inf"))
        mask = m.glue.visibility(mask.repeat(cfg.num_heads // cfg.num_kv_heads, 1), b)   # [g B, T]
        cos = m.cos[e.positions].unsqueeze(1)                                     # [B, 1, Dh]
        sin = m.sin[e.positions].unsqueeze(1)
        layers = {}
        for i in range(start_layer, end_layer):
            def kv(k, v, i=i):                                                    # [Hkv, B, Dh] -> [Hkv, T, Dh]
                cache.k[i].index_copy_(1, slots, k)
                cache.v[i].index_copy_(1, slots, v)
                return cache.k[i, :, :t], cache.v[i, :, :t]
            x = layer_forward(cfg, m.layers[i], x, cos, sin, kv, mask, m.glue)
            if i in hidden_layers:
                layers[i] = x
        out = {"layers": layers, "hidden": x, "logits": None}
        if end_layer >= cfg.num_layers:
            h = m.glue.norm(x, m.norm, cfg.rms_norm_eps)
            out["hidden"] = h
            if logits_on:
                out["logits"] = m.lm_head(h)                                      # [B, V]
        return out

    def _capture(self, e: _Entry, cache, t, start_layer, end_layer, hidden_layers, logits_on) -> bool:
        """Capture the entry's forward; False (and eager from then on) if this shape cannot be captured."""
        if self.failed is not None:
            return False
        t0 = time.perf_counter()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):        # warm-up on a side stream (same inputs: rewrites the same KV rows)
            self._run(e, cache, t, start_layer, end_layer, hidden_layers, logits_on)
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(g, pool=self._pools[id(cache.k)]):
                e.outputs = self._run(e, cache, t, start_layer, end_layer, hidden_layers, logits_on)
        except RuntimeError as err:          # e.g. an op that syncs with the host: stay on the eager static path
            self.failed = str(err).splitlines()[0][:300]
            warnings.warn(f"CUDA graph capture failed, running eagerly: {self.failed}", stacklevel=3)
            return False
        e.graph = g
        self.captured += 1
        self.capture_s += time.perf_counter() - t0
        return True
