"""Hardware-aware draft budget: size each tree from the measured cost curve t(n).

A drafter estimates, for each candidate node, the probability that the target accepts it.
Keeping the m best nodes gives an expected 1 + sum(a_1..a_m) tokens per target pass at a cost
of t(m + 1) (the root is always scored). ``best_prefix`` picks the m that maximizes expected
tokens per second; m = 0 (plain decoding) is allowed, so drafting only happens when it pays.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from draftwise.errors import ConfigError

BENCH_NS = (1, 2, 4, 8, 16, 32, 64)


@dataclass
class CostCurve:
    ns: tuple[int, ...]
    ms: tuple[float, ...]       # milliseconds per forward of n new tokens

    def __post_init__(self):
        if len(self.ns) != len(self.ms) or not self.ns or any(t <= 0 for t in self.ms):
            raise ConfigError("a cost curve needs matching, positive (n, ms) pairs")
        self._ns = np.asarray(self.ns, dtype=float)
        self._ms = np.asarray(self.ms, dtype=float)

    def t(self, n) -> np.ndarray:
        """Interpolated time (ms) for n nodes; linear extrapolation past the last point."""
        n = np.asarray(n, dtype=float)
        out = np.interp(n, self._ns, self._ms)
        if len(self.ns) > 1:
            slope = (self._ms[-1] - self._ms[-2]) / (self._ns[-1] - self._ns[-2])
            out = np.where(n > self._ns[-1], self._ms[-1] + slope * (n - self._ns[-1]), out)
        return out

    @classmethod
    def flat(cls) -> "CostCurve":
        """Verification costs the same for any n (an ideal accelerator): for tests and overrides."""
        return cls((1, 1024), (1.0, 1.0))

    def to_json(self) -> dict:
        return {"ns": list(self.ns), "ms": list(self.ms)}


def best_prefix(gains: torch.Tensor | np.ndarray, cost: CostCurve, max_nodes: int | None = None,
                overhead_ms: float = 0.0) -> int:
    """gains: acceptance probabilities of candidate nodes, best first. Returns how many to keep."""
    g = np.asarray(gains.cpu() if isinstance(gains, torch.Tensor) else gains, dtype=float)
    if max_nodes is not None:
        g = g[:max_nodes]
    if g.size == 0:
        return 0
    m = np.arange(g.size + 1)
    expected = 1.0 + np.concatenate([[0.0], np.cumsum(g)])
    per_ms = expected / (cost.t(m + 1) + np.where(m > 0, overhead_ms, 0.0))
    return int(np.argmax(per_ms))


def _curve_path(key: str) -> Path:
    from draftwise.models.registry import cache_root

    return cache_root() / "costs" / f"{key}.json"


def curve_key(model_id: str, model) -> str:
    safe = "".join(c if c.isalnum() or c in "-._" else "_" for c in model_id)[-80:]
    from draftwise import kernels

    kind = f"fast{kernels.version()[:8]}" if getattr(model, "fast", False) else "torch"
    return f"{safe}-{model.device.type}-{str(model.dtype).split('.')[-1]}-{kind}-t{torch.get_num_threads()}"


@torch.inference_mode()
def measure(model, ns=BENCH_NS, reps: int = 5, context: int = 128, progress: bool = False) -> CostCurve:
    """Median time of one forward of n new tokens (chain mask) after a context of `context`."""
    from tqdm import tqdm

    cache = model.new_cache(context + max(ns) + 1)
    ctx = torch.randint(0, model.cfg.vocab_size, (context,), device=model.device)
    model.forward(ctx, torch.arange(context, device=model.device), cache, logits_rows=slice(context - 1, context))
    cache.commit(context)
    out = []
    for n in tqdm(ns, desc="bench-forward", disable=not progress):
        toks = torch.randint(0, model.cfg.vocab_size, (n,), device=model.device)
        pos = torch.arange(context, context + n, device=model.device)
        mask = torch.ones(n, n, dtype=torch.bool, device=model.device).tril_()
        times = []
        for r in range(reps + 1):
            if model.device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            model.forward(toks, pos, cache, tree_mask=mask)
            if model.device.type == "cuda":
                torch.cuda.synchronize()
            if r:   # first run is a warm-up
                times.append((time.perf_counter() - t0) * 1e3)
        out.append(float(np.median(times)))
    return CostCurve(tuple(ns), tuple(out))


def load_or_measure(model, model_id: str, refresh: bool = False, progress: bool = False, **kw) -> CostCurve:
    path = _curve_path(curve_key(model_id, model))
    if path.is_file() and not refresh:
        try:
            d = json.loads(path.read_text())
            return CostCurve(tuple(d["ns"]), tuple(d["ms"]))
        except (ValueError, KeyError, ConfigError):
            pass   # corrupt cache entry: measure again and overwrite
    curve = measure(model, progress=progress, **kw)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(curve.to_json()))
    os.replace(tmp, path)
    return curve
