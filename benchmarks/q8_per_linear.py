"""Per-linear cost on the default (q8) path: t(n) per call and GMAC/s of each extra row, 2 threads.
Usage: python benchmarks/q8_per_linear.py [MODEL]   (layer 0 and the LM head)"""
import statistics
import sys
import time

import torch

from draftwise import kernels
from draftwise.models import catalog
from draftwise.models.transformer import Transformer

torch.set_num_threads(2)
name = sys.argv[1] if len(sys.argv) > 1 else "qwen2.5-coder-0.5b-instruct"
m = Transformer.from_pretrained(catalog.model_dir(name), weights="gguf")
L = m.layers[0]
lins = {"qkv": L.qkv, "o": L.o, "gate_up": L.gate_up, "down": L.down, "lm_head": m.lm_head}
ns = [1, 2, 4, 8, 16]
print("isa", kernels.isa())
for k, lin in lins.items():
    kinds = [s.kind for s in lin.segs] if lin.segs else lin.act
    xs = {n: torch.randn(n, lin.in_features) for n in ns}
    reps = 5 if k == "lm_head" else 40
    t = {}
    for n in ns:
        lin(xs[n])
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter(); lin(xs[n]); ts.append(time.perf_counter() - t0)
        t[n] = statistics.median(ts) * 1e3
    mac = lin.in_features * lin.out_features
    per = (t[16] - t[1]) / 15
    print(f"{k:8s} {kinds} O={lin.out_features} I={lin.in_features} " + " ".join(f"{t[n]:.3f}" for n in ns)
          + f"  per-row {per:.3f} ms = {mac / per / 1e6:.0f} GMAC/s; n=1 {mac / t[1] / 1e6:.0f}")
