"""Hardware-aware draft budget: size each tree from the measured cost curve t(n).

A drafter estimates, for each candidate node, the probability that the target accepts it.
Keeping the m best nodes gives an expected 1 + sum(a_1..a_m) tokens per target pass at a cost
of t(m + 1, L) + overhead (the root is always scored; L = context length; overhead = the
drafter's own time per step, charged only when it drafts). ``best_prefix`` picks the m that
maximizes expected tokens per second; m = 0 (plain decoding) is allowed, so drafting only
happens when it pays.

t(n, L) is measured at two context lengths and interpolated linearly in L: attention over a long
context makes every extra node dearer (a 1,500-token RAG prompt is not a 128-token one).
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
    ms: tuple[float, ...]                   # milliseconds per forward of n new tokens after `context`
    context: int = 128
    ms_long: tuple[float, ...] | None = None   # the same after `context_long` tokens
    context_long: int | None = None

    def __post_init__(self):
        if len(self.ns) != len(self.ms) or not self.ns or any(t <= 0 for t in self.ms):
            raise ConfigError("a cost curve needs matching, positive (n, ms) pairs")
        if self.ms_long is not None and (len(self.ms_long) != len(self.ns) or not self.context_long
                                         or self.context_long <= self.context or any(t <= 0 for t in self.ms_long)):
            raise ConfigError("a long-context cost curve needs one positive time per n and context_long > context")
        self._ns = np.asarray(self.ns, dtype=float)
        self._ms = np.asarray(self.ms, dtype=float)
        self._ms_long = None if self.ms_long is None else np.asarray(self.ms_long, dtype=float)

    def _interp(self, n: np.ndarray, ms: np.ndarray) -> np.ndarray:
        out = np.interp(n, self._ns, ms)
        if len(self.ns) > 1:
            slope = (ms[-1] - ms[-2]) / (self._ns[-1] - self._ns[-2])
            out = np.where(n > self._ns[-1], ms[-1] + slope * (n - self._ns[-1]), out)
        return out

    def t(self, n, context: int | None = None) -> np.ndarray | float:
        """Time (ms) for n nodes after `context` tokens; linear in n between and past the measured
        points, linear in the context between (and past) the two measured lengths. A float for an int n."""
        if isinstance(n, int):
            return self.t_one(n, context)
        n = np.asarray(n, dtype=float)
        base = self._interp(n, self._ms)
        if context is None or self._ms_long is None:
            return base
        long = self._interp(n, self._ms_long)
        frac = (context - self.context) / (self.context_long - self.context)
        return np.maximum(base + frac * (long - base), 0.5 * base)

    def t_one(self, n: int, context: int | None = None) -> float:
        """t(n, context) for one n, in plain Python (the loop asks it every step; numpy's per-call
        cost was most of it). The same values as :meth:`t`."""
        base = _interp1(n, self.ns, self.ms)
        if context is None or self.ms_long is None:
            return base
        long = _interp1(n, self.ns, self.ms_long)
        frac = (context - self.context) / (self.context_long - self.context)
        return max(base + frac * (long - base), 0.5 * base)

    def observe(self, n: int, ms: float, context: int | None = None) -> None:
        """A fixed curve learns nothing from timed passes (see OnlineCost)."""

    def probe_due(self) -> bool:
        return False

    def scaled(self, f: float) -> "CostCurve":
        """The same curve with every time multiplied by f (e.g. only some of the layers run)."""
        long = None if self.ms_long is None else tuple(t * f for t in self.ms_long)
        return CostCurve(self.ns, tuple(t * f for t in self.ms), self.context, long, self.context_long)

    @classmethod
    def flat(cls) -> "CostCurve":
        """Verification costs the same for any n (an ideal accelerator): for tests and overrides."""
        return cls((1, 1024), (1.0, 1.0))

    def to_json(self) -> dict:
        d = {"ns": list(self.ns), "ms": list(self.ms), "context": self.context}
        if self.ms_long is not None:
            d.update(ms_long=list(self.ms_long), context_long=self.context_long)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "CostCurve":
        long = d.get("ms_long")
        return cls(tuple(d["ns"]), tuple(d["ms"]), int(d.get("context", 128)),
                   None if long is None else tuple(long), d.get("context_long"))


def _interp1(n: float, ns: tuple, ms: tuple) -> float:
    """CostCurve._interp for one n: linear between the points, the last segment's slope past them,
    the first point's time below them."""
    if n <= ns[0]:
        return float(ms[0])
    for i in range(1, len(ns)):
        if n <= ns[i]:
            return ms[i - 1] + (ms[i] - ms[i - 1]) * (n - ns[i - 1]) / (ns[i] - ns[i - 1])
    if len(ns) == 1:
        return float(ms[0])
    return ms[-1] + (ms[-1] - ms[-2]) / (ns[-1] - ns[-2]) * (n - ns[-1])


class OnlineCost:
    """The measured curve, corrected by the passes the decoding loop actually times.

    A curve measured once drifts from the truth: the machine's speed changes between runs
    (+-10-30% here), the loop's own per-pass work (masks, verification, commit) is not in it, and
    the context grows. Each timed pass (n nodes, ms, context) updates a moving average of
    observed / predicted for n's bucket (1, 2, 3-4, 5-8, ...); t(n, L) = curve(n, L) x that
    ratio. Every ``probe_every`` steps without a one-node pass, ``probe_due()`` asks the drafter
    for one (plain decoding: still a token), so t(1), the baseline every draft is weighed
    against, stays measured too. A bucket not measured for ``probe_every`` passes and dearer than
    t(1)'s relaxes toward t(1)'s ratio by ``relax`` at each one-node pass: the first passes of a
    size set its ratio in full, and a size that looked dear once (a slow spell: another process, the
    first request after start-up) would otherwise never be verified again, so never re-measured (a
    bench drafter with a datastore ran 20 prompts without one draft that way).
    """

    def __init__(self, curve: CostCurve, alpha: float = 0.1, probe_every: int = 32, relax: float = 0.1):
        self.curve, self.alpha, self.probe_every, self.relax = curve, alpha, probe_every, relax
        self.ratio = np.ones(12)
        self.count = np.zeros(12)
        self.seen = np.zeros(12, dtype=bool)
        self._filled = np.ones(12)
        self.since_one = 0
        self.passes = 0
        self.last = [0] * 12                             # the pass that last measured each bucket

    @staticmethod
    def bucket(n) -> np.ndarray:
        return np.minimum(np.ceil(np.log2(np.maximum(np.asarray(n, dtype=float), 1.0))).astype(int), 11)

    @staticmethod
    def bucket_one(n: int) -> int:
        """bucket(n) for one int n, without numpy's per-call cost."""
        return min(max(int(n) - 1, 0).bit_length(), 11)

    def observe(self, n: int, ms: float, context: int | None = None) -> None:
        b = self.bucket_one(n)
        r = ms / self.curve.t_one(int(n), context)
        self.count[b] += 1
        a = max(self.alpha, 1.0 / self.count[b])          # a running mean first, then a moving average
        self.ratio[b] = (1 - a) * self.ratio[b] + a * r
        self.seen[b] = True
        self.passes += 1
        self.last[b] = self.passes
        if b == 0:
            self._relax()
        self._fill()
        self.since_one = 0 if n == 1 else self.since_one + 1

    def _relax(self) -> None:
        r1 = float(self.ratio[0])
        for b in range(1, 12):
            if self.seen[b] and self.passes - self.last[b] > self.probe_every and self.ratio[b] > r1:
                self.ratio[b] = r1 + (self.ratio[b] - r1) * (1.0 - self.relax)

    def probe_due(self) -> bool:
        return self.since_one >= self.probe_every

    def t(self, n, context: int | None = None) -> np.ndarray:
        if isinstance(n, int):
            return self.curve.t_one(n, context) * float(self._filled[self.bucket_one(n)])
        return self.curve.t(n, context) * self._filled[self.bucket(n)]

    def _fill(self) -> None:
        """An unseen bucket takes the larger ratio of its nearest seen neighbours below and above
        (cautious: a tree size never measured is not assumed cheap); 1.0 before any observation.
        Twelve buckets: plain Python, where numpy's per-call cost was most of a step's bookkeeping."""
        ratio, seen = self.ratio.tolist(), self.seen.tolist()
        below, last = [None] * 12, None
        for i in range(12):
            last = ratio[i] if seen[i] else last
            below[i] = last
        out, nxt = [1.0] * 12, None
        for i in range(11, -1, -1):
            nxt = ratio[i] if seen[i] else nxt
            cand = [v for v in (below[i], nxt) if v is not None]
            out[i] = max(cand) if cand else 1.0
        self._filled = np.array(out)


def online_cost(engine, max_nodes: int | None) -> "OnlineCost | None":
    """The cost model of a budgeted drafter: none when max_nodes fixes the size, else the engine's
    measured curve corrected online."""
    return None if max_nodes is not None else OnlineCost(engine.cost_curve())


class Overhead:
    """Running estimate (ms) of a drafter's own time per step (propose + observe), an exponential
    moving average: ``with overhead:`` (or ``start``/``stop``) around each timed part, ``commit``
    once per step."""

    def __init__(self, alpha: float = 0.1):
        self.alpha, self.ms, self._t0, self._step = alpha, 0.0, 0.0, 0.0

    def start(self) -> None:
        self._t0 = time.perf_counter()

    def stop(self) -> None:
        self._step += (time.perf_counter() - self._t0) * 1e3

    def __enter__(self) -> "Overhead":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def discard(self) -> None:
        """Forget this step's time (a step that did not draft this way)."""
        self._step = 0.0

    def commit(self) -> None:
        ms, self._step = self._step, 0.0
        self.ms = ms if self.ms == 0.0 else (1 - self.alpha) * self.ms + self.alpha * ms


def best_prefix(gains: torch.Tensor | np.ndarray | list, cost: CostCurve, max_nodes: int | None = None,
                overhead_ms: float = 0.0, context: int | None = None, patience: int | None = None) -> int:
    """gains: acceptance probabilities of candidate nodes, best first. Returns how many to keep.

    patience: None scores every prefix (numpy); an int walks the sizes in plain Python and stops once that
    many sizes in a row did not beat the best (gains fall and t(n) rises, so a later size rarely wins;
    for a drafter whose step budget is a millisecond, where numpy's per-call cost was most of this)."""
    if patience is not None:
        g = gains.tolist() if hasattr(gains, "tolist") else list(gains)
        if max_nodes is not None:
            g = g[:max_nodes]
        best_m, best, e = 0, 1.0 / float(cost.t(1, context)), 1.0
        for m in range(1, len(g) + 1):
            e += g[m - 1]
            v = e / (float(cost.t(m + 1, context)) + overhead_ms)
            if v > best:
                best, best_m = v, m
            elif m - best_m >= patience:
                break
        return best_m
    g = np.asarray(gains.cpu() if isinstance(gains, torch.Tensor) else gains, dtype=float)
    if max_nodes is not None:
        g = g[:max_nodes]
    if g.size == 0:
        return 0
    m = np.arange(g.size + 1)
    expected = 1.0 + np.concatenate([[0.0], np.cumsum(g)])
    per_ms = expected / (cost.t(m + 1, context) + np.where(m > 0, overhead_ms, 0.0))
    return int(np.argmax(per_ms))


def _curve_path(key: str) -> Path:
    from draftwise.paths import cache_root

    return cache_root() / "costs" / f"{key}.json"


def curve_key(model_id: str, model) -> str:
    safe = "".join(c if c.isalnum() or c in "-._" else "_" for c in model_id)[-80:]
    from draftwise import kernels

    kind = f"fast{kernels.version()[:8]}-{kernels.isa()}" if getattr(model, "fast", False) else \
        "invariant" if getattr(model, "invariant", False) else "torch"
    if getattr(model, "weights", "fp32") != "fp32":
        kind += f"-{model.weights}"
    if getattr(model, "graphs", "off") != "off":
        kind += f"-graphs{model.graphs}"
    return f"{safe}-{model.device.type}-{str(model.dtype).split('.')[-1]}-{kind}-t{torch.get_num_threads()}-m{MEASURE_VERSION}"


MEASURE_VERSION = 2        # part of the cache key: curves measured the older way are measured again


@torch.inference_mode()
def measure(model, ns=BENCH_NS, reps: int = 7, context: int = 128, context_long: int | None = 1024,
            progress: bool = False) -> CostCurve:
    """Median time of one forward of n new tokens (chain mask) after `context` tokens, and again
    after `context_long` tokens (None: skip). The node counts are measured round-robin (every round
    times each n once), so a slow phase of the machine (shared hosts drift by 10-50% for seconds at a
    time) lands on all n alike and the ratios between them hold; a curve is made non-decreasing in n."""
    from tqdm import tqdm

    contexts = [c for c in (context, context_long) if c is not None and c + max(ns) + 1 <= model.max_len]
    warm = 2 if getattr(model, "graphs", "off") == "on" else 1       # a graph is captured on the second run
    bar = tqdm(total=(reps + warm) * len(contexts), disable=not progress,
               desc="measuring this machine's forward cost t(n) once (cached for later runs)")
    curves = []
    for ctx_len in contexts:
        cache = model.new_cache(ctx_len + max(ns) + 1)
        ctx = torch.randint(0, model.cfg.vocab_size, (ctx_len,), device=model.device)
        model.forward(ctx, torch.arange(ctx_len, device=model.device), cache, logits_rows=slice(ctx_len - 1, ctx_len))
        cache.commit(ctx_len)
        inputs = {n: (torch.randint(0, model.cfg.vocab_size, (n,), device=model.device),
                      torch.arange(ctx_len, ctx_len + n, device=model.device),
                      torch.ones(n, n, dtype=torch.bool, device=model.device).tril_()) for n in ns}
        times: dict[int, list[float]] = {n: [] for n in ns}
        for r in range(reps + warm):
            for n in ns:
                toks, pos, mask = inputs[n]
                if model.device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                model.forward(toks, pos, cache, tree_mask=mask)
                if model.device.type == "cuda":
                    torch.cuda.synchronize()
                if r >= warm:
                    times[n].append((time.perf_counter() - t0) * 1e3)
            bar.update(1)
        curves.append(tuple(np.maximum.accumulate([float(np.median(times[n])) for n in ns]).tolist()))
    bar.close()
    if len(curves) == 2:
        return CostCurve(tuple(ns), curves[0], context, curves[1], context_long)
    return CostCurve(tuple(ns), curves[0], context)


def load_or_measure(model, model_id: str, refresh: bool = False, progress: bool = False, **kw) -> CostCurve:
    path = _curve_path(curve_key(model_id, model))
    if path.is_file() and not refresh:
        try:
            return CostCurve.from_json(json.loads(path.read_text()))
        except (ValueError, KeyError, ConfigError):
            pass   # corrupt cache entry: measure again and overwrite
    curve = measure(model, progress=progress, **kw)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(curve.to_json()))
    os.replace(tmp, path)
    return curve
