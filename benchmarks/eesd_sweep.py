"""Choose N for EESD: train a short exit layer after N = 3, 6, 8 of the 0.5B's 24 layers (1/8,
1/4, 1/3) on the same teacher features and the same number of steps, and compare validation
agreement with the target; also compare the two initialisations at one N, and agreement against
training-data size.

    python benchmarks/eesd_sweep.py --features DIR --out benchmarks/results/eesd/sweep.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import draftwise
from draftwise.train.early_exit import train_exit


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--features", required=True)
    ap.add_argument("--work", default="/tmp/eesd-sweep")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--max-tokens", type=int, default=400_000)
    ap.add_argument("--runs", default="3:next,6:next,8:next,6:last")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    eng = draftwise.load(a.model, threads=2)
    out = Path(a.out)
    res = json.loads(out.read_text()) if out.is_file() else {"model": a.model, "runs": {}}
    for run in a.runs.split(","):
        layer, init, *tok = run.split(":")
        max_tokens = int(tok[0]) if tok else a.max_tokens
        key = f"N{layer}-{init}-{max_tokens}-{a.steps}"
        if key in res["runs"]:
            continue
        info = train_exit(eng, int(layer), Path(a.work) / f"{key}.safetensors", max_tokens=max_tokens,
                          max_steps=a.steps, init=init, features=Path(a.features))
        info.pop("data", None)
        res["runs"][key] = info
        print(key, f"agreement {info['val_agree_init']:.3f} -> {info['val_agree']:.3f} in {info['train_s']:.0f} s",
              flush=True)
        out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
