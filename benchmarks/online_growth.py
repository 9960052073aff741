"""Online datastore growth (SuffixDecoding-style; off by default elsewhere): a workload that repeats
its tasks. N prompts are answered once (round 1), then again (round 2). ``retrieval`` with
``online: true`` adds every finished prompt + answer to the datastore's in-memory overlay, so round 2
drafts from round 1's answers; ``online: false`` is the same drafter without it. Greedy, outputs
checked against AR. Results: benchmarks/results/rasd/online-growth.json.

    python benchmarks/online_growth.py --model qwen2.5-coder-0.5b-instruct --dataset mtbench --limit 10
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import draftwise  # noqa: E402
from draftwise.corpora import balanced, load  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--dataset", default="mtbench")
    ap.add_argument("--limit", type=int, default=10)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--json", default="benchmarks/results/rasd/online-growth.json")
    a = ap.parse_args()
    eng = draftwise.load(a.model, threads=2, progress=False)
    qs = balanced(load(a.dataset), a.limit)
    eng.generate("def f(x):", max_new_tokens=8)
    ref = {q["question_id"]: eng.generate(q["turns"][0], max_new_tokens=a.max_new_tokens, chat=q["chat"]).token_ids
           for q in qs}
    res = {}
    for label, opts in (("ar", None), ("static", {"online": False}), ("online", {"online": True})):
        for rnd in (1, 2):
            tok = passes = 0
            secs = 0.0
            same = True
            for q in qs:
                t = time.perf_counter()
                r = eng.generate(q["turns"][0], method="ar" if opts is None else "retrieval", method_opts=opts,
                                 max_new_tokens=a.max_new_tokens, chat=q["chat"])
                secs += time.perf_counter() - t
                tok += len(r.token_ids)
                passes += r.stats.steps
                same &= r.token_ids == ref[q["question_id"]]
            res[f"{label}/round{rnd}"] = {"tokens_per_s": round(tok / secs, 2), "tau": round(tok / max(passes, 1), 2),
                                         "identical": bool(same)}
            print(label, rnd, res[f"{label}/round{rnd}"], flush=True)
    for k in list(res):
        res[k]["x_ar"] = round(res[k]["tokens_per_s"] / res["ar/" + k.split("/")[1]]["tokens_per_s"], 2)
    out = {"model": a.model, "dataset": a.dataset, "limit": a.limit, "max_new_tokens": a.max_new_tokens,
           "machine": "2-core VM, fp32, 2 threads", "results": res}
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
