"""GPU check: the forward cost curve, our AR vs HF `generate`, and every method's speed and
losslessness on CUDA, in one process.

    python benchmarks/gpu_check.py --model path/to/model.gguf --prompts prompts.jsonl \
        --random-config qwen0.5b.json --dtypes bfloat16,float32 --out gpu_out

--model: anything draftwise resolves (registry name, HF folder, .gguf file) with its tokenizer.
--random-config: an HF config.json; the model gets random weights (HF's init) on the GPU: its
speeds are real for that shape, its acceptance is not (random weights draft nothing useful).
Prompts: JSONL with a "prompt" field; random models reuse the first real model's token ids.
Writes results.json and results.md to --out.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from draftwise.decoding import generate
from draftwise.drafters.base import Drafter
from draftwise.drafters.lookup import PromptLookup
from draftwise.drafters.recycling import TokenRecycling
from draftwise.models.checkpoint import resolve
from draftwise.models.config import ModelConfig
from draftwise.models.transformer import Transformer
from draftwise.policies.budget import measure

NS = (1, 2, 4, 8, 16, 32, 64, 128)


DEVICE = "cuda"


def sync():
    if DEVICE.startswith("cuda"):
        torch.cuda.synchronize()


def hf_generate(hf, ids: list[int], n: int) -> tuple[list[int], float]:
    x = torch.tensor([ids], device=DEVICE)
    sync()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False)
    sync()
    return out[0, len(ids):].tolist(), time.perf_counter() - t0


def run_model(name: str, net: Transformer, hf, prompts: list[list[int]], max_new: int) -> dict:
    curve = measure(net, ns=NS, reps=10)
    methods = {"ar": lambda: Drafter(),
               "recycling": lambda: TokenRecycling(net.cfg.vocab_size, cost=curve, device=net.device),
               "lookup": lambda: PromptLookup(cost=curve)}
    drafters = {m: f() for m, f in methods.items()}
    generate(net, prompts[0], max_new_tokens=16)                       # warm-up
    hf_generate(hf, prompts[0], 8)
    rows = []
    for p, ids in enumerate(prompts):
        row = {"prompt": p}
        ref = None
        for m, d in drafters.items():
            sync()
            t0 = time.perf_counter()
            out, st = generate(net, ids, drafter=d, max_new_tokens=max_new)   # no EOS: fixed length
            sync()
            wall = time.perf_counter() - t0
            ref = out if m == "ar" else ref
            row[m] = {"tok_s": len(out) / wall, "tau": st.tau, "tree": sum(st.tree_sizes) / max(1, len(st.tree_sizes)),
                      "identical": out == ref}
        out, wall = hf_generate(hf, ids, max_new)
        row["hf"] = {"tok_s": len(out) / wall, "identical": out == ref, "first_diff": _first_diff(out, ref)}
        rows.append(row)
        print(name, p, {k: (round(v["tok_s"], 1), v.get("identical")) for k, v in row.items() if k != "prompt"},
              flush=True)
    mean = lambda key, m: sum(r[m][key] for r in rows) / len(rows)   # noqa: E731
    summary = {m: {"tok_s": mean("tok_s", m), "speedup_vs_ar": sum(r[m]["tok_s"] / r["ar"]["tok_s"] for r in rows) / len(rows),
                   "identical": sum(r[m]["identical"] for r in rows)} for m in ("ar", "recycling", "lookup", "hf")}
    for m in ("recycling", "lookup"):
        summary[m]["tau"] = mean("tau", m)
        summary[m]["tree"] = mean("tree", m)
    return {"model": name, "dtype": str(net.dtype).split(".")[-1], "curve_ms": dict(zip(curve.ns, curve.ms)),
            "samples": len(rows), "summary": summary, "rows": rows}


def _first_diff(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def main() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", action="append", default=[])
    ap.add_argument("--random-config", action="append", default=[])
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--limit", type=int, default=5)
    ap.add_argument("--out", default="gpu_out")
    ap.add_argument("--device", default="cuda", help="cpu only to try the script out")
    a = ap.parse_args()
    global DEVICE
    DEVICE = a.device
    texts = [json.loads(line)["prompt"] for line in Path(a.prompts).read_text().splitlines() if line.strip()][: a.limit]
    results, ids = [], None
    dev = {"gpu": torch.cuda.get_device_name() if DEVICE.startswith("cuda") else "cpu", "torch": torch.__version__}
    for spec in a.model + a.random_config:
        for dt in a.dtypes.split(","):
            dtype = getattr(torch, dt)
            if spec in a.model:
                path = resolve(spec)
                tok = AutoTokenizer.from_pretrained(str(path))
                ids = ids or [tok.encode(t) for t in texts]
                net = Transformer.from_pretrained(path, device=DEVICE, dtype=dtype)
                hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(DEVICE).eval()
                name = Path(spec).name
            else:
                cfg = AutoConfig.from_pretrained(spec)
                torch.manual_seed(0)
                with torch.device(DEVICE):
                    hf = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
                net = Transformer(ModelConfig.from_hf(cfg.to_dict()), hf.state_dict(), device=DEVICE, dtype=dtype)
                name = f"random-{Path(spec).stem}"
            hf.generation_config.eos_token_id = None      # both sides run the full length, EOS or not
            hf.generation_config.pad_token_id = 0
            prompts = [[t % net.cfg.vocab_size for t in p] for p in ids]
            results.append(run_model(name, net, hf, prompts, a.max_new_tokens))
            del net, hf
            if DEVICE.startswith("cuda"):
                torch.cuda.empty_cache()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"device": dev, "results": results}, indent=1))
    lines = [f"GPU: {dev['gpu']}, torch {dev['torch']}, greedy, {a.max_new_tokens} new tokens, {len(texts)} prompts", "",
             "| model | dtype | t(1) ms | t(16)/t(1) | t(64)/t(1) | AR tok/s | HF tok/s | AR/HF | recycling | lookup | tau rec/lookup | identical to AR (rec/lookup/HF) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        s, c = r["summary"], r["curve_ms"]
        lines.append(f"| {r['model']} | {r['dtype']} | {c[1]:.2f} | {c[16] / c[1]:.2f} | {c[64] / c[1]:.2f} | "
                     f"{s['ar']['tok_s']:.1f} | {s['hf']['tok_s']:.1f} | {s['ar']['tok_s'] / s['hf']['tok_s']:.2f}x | "
                     f"{s['recycling']['speedup_vs_ar']:.2f}x | {s['lookup']['speedup_vs_ar']:.2f}x | "
                     f"{s['recycling']['tau']:.2f}/{s['lookup']['tau']:.2f} | "
                     f"{s['recycling']['identical']}/{s['lookup']['identical']}/{s['hf']['identical']} of {r['samples']} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
