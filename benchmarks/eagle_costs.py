"""EAGLE costs on one target: one head forward (fc + layer + read-out, one token, vocabulary subset
or full) next to the target's pass over n tokens, at a given context.

    python benchmarks/eagle_costs.py --model qwen2.5-coder-0.5b-instruct --head HEAD --json OUT.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import draftwise
from draftwise.drafters import eagle3
from draftwise.drafters.eagle import load_head


def timed(fn, reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--head", required=True)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    eng = draftwise.load(a.model, threads=2)
    m = eng.model
    head = load_head(a.head, m)
    ctx = torch.randint(0, 30000, (a.context,))
    cache = m.new_cache()
    m.forward(ctx, torch.arange(a.context), cache)
    cache.commit(a.context)
    v3 = isinstance(head, eagle3.Eagle3Head)          # catch-up rows read fused 3 D features, drafted rows D
    hc = head.new_cache(a.context + 16)
    wide = (3 if v3 else 1) * m.cfg.hidden_size
    head.forward(ctx[1:], torch.randn(a.context - 1, wide), torch.arange(1, a.context), hc)
    hc.commit(a.context - 1)
    tok, f, pos = torch.tensor([11]), torch.randn(1, m.cfg.hidden_size), torch.tensor([a.context])
    sub = head.lm_head if v3 else m.lm_head.rows(eng.vocab_subset(32768).ids)
    res = {"model": a.model, "context": a.context, "threads": torch.get_num_threads(), "head_version": 3 if v3 else 1,
           "head_layer_ms": timed(lambda: (head.forward(tok, f, pos, hc), hc.discard()), a.reps)}
    res["head_step_ms_subset32k"] = timed(lambda: (sub(head.forward(tok, f, pos, hc)), hc.discard()), a.reps)
    if v3:
        g = torch.randn(1, wide)
        res["head_catch_up_row_ms"] = timed(lambda: (sub(head.forward(tok, g, pos, hc)), hc.discard()), a.reps)
    else:
        res["head_step_ms_full"] = timed(lambda: (m.lm_head(head.forward(tok, f, pos, hc)), hc.discard()), a.reps)

    def full(n):
        toks = torch.randint(0, 30000, (n,))
        p = torch.arange(a.context, a.context + n)
        return lambda: (m.forward(toks, p, cache), cache.discard())

    res["t_target_ms"] = {n: timed(full(n), a.reps) for n in range(1, 9)}
    print(json.dumps(res, indent=1))
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
