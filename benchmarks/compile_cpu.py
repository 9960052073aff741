"""torch.compile'd layer glue on CPU: t(n) of a model with eager vs compiled non-matmul steps.

    python benchmarks/compile_cpu.py --model qwen2.5-coder-0.5b-instruct --ns 1,8 --reps 15 --out results.json

Both models share the checkpoint and the prepacked kernel; only the glue between the matmuls
(q/k norms + rotary, residual + RMSNorm, SiLU x up) differs. Forwards are interleaved (eager,
compiled, eager, ...) after a 128-token context, medians reported. Also reported: compile time
(first calls), and whether the compiled path keeps rows bit-identical between n = 1 and n > 1
and how far its logits are from the eager path's.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from draftwise.models.checkpoint import load_config, load_state_dict, resolve
from draftwise.models.transformer import Transformer, prefill


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--ns", default="1,8")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--mode", default="layer", choices=["glue", "layer"], help="what torch.compile covers")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    path = resolve(a.model, progress=False)
    cfg, state = load_config(path), load_state_dict(path)
    nets = {"eager": Transformer(cfg, state, max_len=1024),
            "compiled": Transformer(cfg, state, max_len=1024, compile=a.mode)}
    del state
    ns = [int(x) for x in a.ns.split(",")]
    g = torch.Generator().manual_seed(0)
    ctx = torch.randint(0, cfg.vocab_size, (a.context,), generator=g)
    caches = {}
    with torch.inference_mode():
        for k, m in nets.items():
            caches[k] = m.new_cache(a.context + max(ns) + 1)
            prefill(m, caches[k], ctx)
        res = {"model": a.model, "mode": a.mode, "threads": torch.get_num_threads(), "context": a.context, "t_ms": {}, "compile_s": {}}
        for n in ns:
            toks = torch.randint(0, cfg.vocab_size, (n,), generator=g)
            pos = torch.arange(a.context, a.context + n)
            t0 = time.perf_counter()
            nets["compiled"].forward(toks, pos, caches["compiled"])        # compiles this shape
            res["compile_s"][n] = time.perf_counter() - t0
            times = {k: [] for k in nets}
            for _ in range(a.reps + 1):
                for k, m in nets.items():
                    t0 = time.perf_counter()
                    m.forward(toks, pos, caches[k])
                    times[k].append((time.perf_counter() - t0) * 1e3)
            res["t_ms"][n] = {k: statistics.median(v[1:]) for k, v in times.items()}
            print(n, {k: round(v, 2) for k, v in res["t_ms"][n].items()}, "compile", round(res["compile_s"][n], 1), "s",
                  flush=True)
        # numerics: compiled vs eager logits; compiled rows at n = 1 vs inside an n = 8 chain
        toks = torch.randint(0, cfg.vocab_size, (8,), generator=g)
        pos = torch.arange(a.context, a.context + 8)
        many = {k: m.forward(toks, pos, caches[k]).logits for k, m in nets.items()}
        one = nets["compiled"].forward(toks[:1], pos[:1], caches["compiled"]).logits[0]
        res["max_abs_diff_vs_eager"] = float((many["compiled"] - many["eager"]).abs().max())
        res["rows_bit_identical_n1_vs_n8"] = bool(torch.equal(one, many["compiled"][0]))
        eager_one = nets["eager"].forward(toks[:1], pos[:1], caches["eager"]).logits[0]
        res["eager_rows_bit_identical_n1_vs_n8"] = bool(torch.equal(eager_one, many["eager"][0]))
    print(json.dumps(res, indent=1))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
