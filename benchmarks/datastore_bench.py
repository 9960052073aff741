"""Datastore build time and lookup latency (issue 10's goals: >= 30M tokens built in under 5 min,
a lookup in under 1 ms). Builds one datastore from the given inputs, then times ``retrieve`` (longest
context-suffix match, up to 64 continuations of 16 tokens) on contexts cut from real prompts.

    python benchmarks/datastore_bench.py --model qwen2.5-coder-0.5b-instruct \
        --input stdlib: --input sharegpt: --input "$(python -c 'import site; print(site.getsitepackages()[0])')" \
        --out /tmp/big.dwds --json benchmarks/results/datastore.json
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from draftwise import datastore  # noqa: E402
from draftwise.corpora import humaneval, mtbench  # noqa: E402
from draftwise.models.checkpoint import resolve  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--input", action="append", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--max-tokens", type=int, default=None)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(resolve(a.model)))
    t0 = time.perf_counter()
    h = datastore.build(tok, a.input, a.out, model=a.model, max_tokens=a.max_tokens)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ds = datastore.Datastore.load(a.out)
    load_s = time.perf_counter() - t0
    prompts = [q["turns"][0] for q in humaneval()[:40]] + [q["turns"][0] for q in mtbench()[:40]]
    rng = np.random.default_rng(0)
    times, lens, conts = [], [], []
    for text in prompts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        for _ in range(10):                       # contexts ending at random positions of the prompt
            end = int(rng.integers(min(8, len(ids)), len(ids) + 1))
            ctx = np.asarray(ids[:end], dtype=np.int64)
            t = time.perf_counter()
            n, c = ds.retrieve(ctx, max_conts=64, max_len=16)
            times.append((time.perf_counter() - t) * 1e3)
            lens.append(n)
            conts.append(len(c))
    ms = np.asarray(times)
    res = {"model": a.model, "inputs": a.input, "tokens": h["tokens"], "documents": h["documents"],
           "file_mb": round(Path(a.out).stat().st_size / 2**20, 1), "build_s": round(build_s, 1),
           "load_verify_s": round(load_s, 2), "lookups": int(ms.size), "lookup_ms_mean": round(float(ms.mean()), 3),
           "lookup_ms_p50": round(float(np.median(ms)), 3), "lookup_ms_p99": round(float(np.percentile(ms, 99)), 3),
           "match_len_mean": round(float(np.mean(lens)), 2), "hit_rate": round(float(np.mean(np.asarray(lens) > 0)), 3),
           "continuations_mean": round(float(np.mean(conts)), 1), "machine": platform.processor() or platform.machine()}
    print(json.dumps(res, indent=1))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
