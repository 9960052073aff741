"""t(n) of a model next to this machine's roofline.

Roofline(n) = max(weight bytes / read bandwidth, 2 * n * params / peak FLOP/s). Bandwidth and peak
are measured here (torch sum over 2 GiB; a 2048^3 sgemm with OpenBLAS), and the issue's nominal
40 GB/s / 120 GFLOP/s are shown too.

Usage: python benchmarks/roofline.py qwen2.5-coder-0.5b-instruct [--threads 2]
"""
import argparse
import time

import numpy as np
import torch


def measure_bandwidth() -> float:
    """Read bandwidth with all threads: the best of several sums over 2 GiB (no cache reuse)."""
    a = torch.ones(2**29, dtype=torch.float32)            # 2 GiB
    a.sum()
    best = min(_t(lambda: a.sum()) for _ in range(5))
    return a.numel() * 4 / best


def measure_peak() -> float:
    x = np.random.rand(2048, 2048).astype(np.float32)
    x @ x
    best = min(_t(lambda: x @ x) for _ in range(3))
    return 2 * 2048**3 / best


def _t(f) -> float:
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    import draftwise
    from draftwise.policies.budget import load_or_measure

    eng = draftwise.load(a.model, threads=a.threads)
    m = eng.model
    lin = [m.lm_head] + [x for L in m.layers for x in (L.qkv, L.o, L.gate_up, L.down)]
    params = sum(x.in_features * x.out_features for x in lin)
    bw, peak = measure_bandwidth(), measure_peak()
    curve = load_or_measure(m, eng.model_id)
    print(f"{a.model}: {params / 1e6:.0f} M matmul params ({params * 4 / 1e9:.2f} GB fp32); measured read "
          f"bandwidth {bw / 1e9:.1f} GB/s, sgemm peak {peak / 1e9:.0f} GFLOP/s")
    print("| n | t(n) ms | t(n)/t(1) | roofline (measured) ms | ratio | roofline (40 GB/s, 120 GFLOP/s) ms | ratio |")
    print("|---|---|---|---|---|---|---|")
    for n, ms in zip(curve.ns, curve.ms):
        r1 = max(params * 4 / bw, 2 * n * params / peak) * 1e3
        r2 = max(params * 4 / 40e9, 2 * n * params / 120e9) * 1e3
        print(f"| {n} | {ms:.1f} | {ms / curve.ms[0]:.2f} | {r1:.1f} | {ms / r1:.2f} | {r2:.1f} | {ms / r2:.2f} |")


if __name__ == "__main__":
    main()
