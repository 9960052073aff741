"""EESD costs on one target: the draft step (first N layers + exit layer + subset head, one token)
and the verification pass with and without reusing the first N layers, for several N.

    python benchmarks/eesd_costs.py --model qwen2.5-coder-0.5b-instruct --layers 3 6 8 --json OUT.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import draftwise
from draftwise.drafters.early_exit import PREFIX, EarlyExit, exit_layer
from draftwise.models.checkpoint import load_state_dict
from draftwise.models.layout import layer_names
from draftwise.policies.length import FixedK


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
    ap.add_argument("--layers", type=int, nargs="+", default=[3, 6, 8])
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    eng = draftwise.load(a.model, threads=2)
    m = eng.model
    L = m.cfg.num_layers
    state = load_state_dict(eng.path)
    sub = eng.vocab_subset(32768)
    ctx = torch.randint(0, 30000, (a.context,))
    cache = m.new_cache()
    m.forward(ctx, torch.arange(a.context), cache)
    cache.commit(a.context)
    res = {"model": a.model, "layers_total": L, "context": a.context, "threads": torch.get_num_threads(), "rows": []}

    def full(n):
        toks = torch.randint(0, 30000, (n,))
        pos = torch.arange(a.context, a.context + n)
        return lambda: (m.forward(toks, pos, cache), cache.discard())

    t_full = {n: timed(full(n), a.reps) for n in (1, 2, 4, 8)}
    res["t_full_ms"] = t_full
    for N in a.layers:
        ex = exit_layer(m, {PREFIX + k: state[f"model.layers.{L - 1}.{k}"] for k in layer_names(m.cfg)})
        d = EarlyExit(m, N, FixedK(1), exit=ex, subset=sub)
        d.cache.truncate(0)
        h = m.forward(ctx, torch.arange(a.context), m.new_cache(), end_layer=N).hidden
        d.exit_forward(h, torch.arange(a.context), logits=False)
        d.cache.commit(a.context)
        pos = torch.tensor([a.context])
        tok = torch.tensor([17])

        def draft_step():
            x = m.forward(tok, pos, cache, end_layer=N).hidden
            d.exit_forward(x, pos, logits=True)
            d.cache.discard()
            cache.discard()

        def first_layers():
            m.forward(tok, pos, cache, end_layer=N)
            cache.discard()

        row = {"layer": N, "draft_step_ms": timed(draft_step, a.reps), "first_layers_ms": timed(first_layers, a.reps)}
        for n in (1, 2, 4, 8):
            toks = torch.randint(0, 30000, (n,))
            p = torch.arange(a.context, a.context + n)
            hin = torch.randn(n, m.cfg.hidden_size)
            row[f"verify_from_N_ms_n{n}"] = timed(lambda: (m.forward(toks, p, cache, start_layer=N, hidden_in=hin),
                                                           cache.discard()), a.reps)
            row[f"verify_full_ms_n{n}"] = t_full[n]
        res["rows"].append(row)
        print(json.dumps(row), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
