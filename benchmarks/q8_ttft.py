"""Time to first token for a long prompt (default 1,500 tokens of Python standard-library source), our
GGUF modes next to llama.cpp on the same file, interleaved, best of --reps. Usage:
    python benchmarks/q8_ttft.py [--model M] [--tokens 1500] [--modes gguf,gguf-f32] [--reps 3] [--out F]
"""
import argparse
import inspect
import json
import time

import torch

import draftwise
from draftwise.bench.baselines import Baselines
from draftwise.models.transformer import Transformer, prefill


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--tokens", type=int, default=1500)
    ap.add_argument("--modes", default="gguf,gguf-f32")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-llamacpp", action="store_true")
    ap.add_argument("--out")
    a = ap.parse_args()
    from draftwise import kernels

    eng = draftwise.load(a.model, weights="gguf", progress=False, threads=2)
    nets = {m: (eng.model if m == "gguf" else Transformer.from_pretrained(eng.path, weights=m)) for m in a.modes.split(",")}
    text = inspect.getsource(inspect.getmodule(argparse))
    ids = eng.encode(text)[: a.tokens]
    base = Baselines(eng)
    runs = list(nets) + ([] if a.no_llamacpp else ["llamacpp"])
    if not a.no_llamacpp:
        base.check(["llamacpp"])
        base.generate("llamacpp", ids[:8], 1)                       # loads the model, untimed
    best = {r: float("inf") for r in runs}
    with torch.inference_mode():
        for _ in range(a.reps):
            for r in runs:
                if r in nets:
                    m = nets[r]
                    c = m.new_cache(len(ids) + 8)
                    t0 = time.perf_counter()
                    prefill(m, c, torch.tensor(ids))
                    best[r] = min(best[r], time.perf_counter() - t0)
                else:
                    base.generate(r, ids, 1)
                    best[r] = min(best[r], base.first_token_s)
            print({r: round(v, 3) for r, v in best.items()}, flush=True)
    res = {"model": a.model, "prompt_tokens": len(ids), "isa": kernels.isa(), "threads": 2,
           "ttft_s": best, "prefill_tok_s": {r: len(ids) / v for r, v in best.items()}}
    print(json.dumps(res, indent=1))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
