"""t(n) of one forward on the GGUF blocks: 8-bit activations on each ISA the CPU has vs fp32 activations.

Every (mode, ISA, n) is measured round-robin in one process (shared-host clock drift lands on all alike);
the median of --reps is reported. Usage: python benchmarks/q8_tn.py [MODEL] [--ns 1,2,4,8] [--reps 7] [--out F]
"""
import argparse
import json
import statistics
import time

import torch

from draftwise import kernels
from draftwise.models import catalog
from draftwise.models.transformer import Transformer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default=catalog.DEFAULT_MODEL)
    ap.add_argument("--ns", default="1,2,3,4,6,8,12,16,24,32,48,64")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--ctx", type=int, default=128, help="committed tokens in the cache")
    ap.add_argument("--modes", default="gguf,gguf-f32")
    ap.add_argument("--out")
    a = ap.parse_args()
    torch.set_num_threads(2)
    path = catalog.model_dir(a.model)
    ns = [int(v) for v in a.ns.split(",")]
    engines = {}
    for mode in a.modes.split(","):
        m = Transformer.from_pretrained(path, weights=mode)
        isas = kernels.supported_isas() if mode == "gguf" else (kernels.isa(),)
        for isa in isas:
            engines[(mode, isa)] = m
    times = {k: {n: [] for n in ns} for k in engines}
    caches = {}
    for (mode, isa), m in engines.items():
        c = m.new_cache()
        m.forward(torch.arange(a.ctx), torch.arange(a.ctx), c)
        c.commit(a.ctx)
        caches[(mode, isa)] = c
    for rep in range(a.reps + 1):
        for n in ns:
            for key, m in engines.items():
                kernels.set_isa(key[1])
                c = caches[key]
                end = c.end
                toks = torch.randint(0, 1000, (n,))
                pos = torch.arange(end, end + n)
                t0 = time.perf_counter()
                m.forward(toks, pos, c)
                dt = time.perf_counter() - t0
                if rep:
                    times[key][n].append(dt * 1e3)
    res = {f"{mode}/{isa}": {n: statistics.median(v) for n, v in d.items()} for (mode, isa), d in times.items()}
    print("n      " + "  ".join(f"{k:>16}" for k in res))
    for n in ns:
        print(f"{n:<6} " + "  ".join(f"{res[k][n]:16.1f}" for k in res))
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"model": a.model, "ctx": a.ctx, "reps": a.reps, "threads": 2, "cpu_flags_isas": kernels.supported_isas(),
                       "t_ms": res}, f, indent=1)


if __name__ == "__main__":
    main()
