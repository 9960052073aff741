"""Issue 30: what following the committed text in the draft's own tokens costs. For a Qwen2.5 target and the
SmolLM2-135M draft (another tokenizer), per step: rows the draft's catch-up feeds, rows fed again because
re-encoding the tail changed them (re-sync), and the catch-up forward's time, next to the draft steps' and
the target pass's. HumanEval 0-4 and MT-Bench 0-4 first turns, greedy, 128 new tokens.
    python benchmarks/crossvocab_catchup.py [--model qwen2.5-coder-1.5b-instruct] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import json
import time

import draftwise
from draftwise import corpora


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    ap.add_argument("--draft", default="smollm2-135m-instruct")
    ap.add_argument("--n", type=int, default=5)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    eng = draftwise.load(a.model, draft=a.draft, progress=False)
    rows = {}
    for cross in ("tli", "string"):
        d = eng.drafter("draft-model", {"tree": "chain", "cross": cross})
        timed = {"catch_up_ms": 0.0, "catch_ups": 0, "rows": 0}
        orig = d.forward_draft

        def forward_draft(tokens, positions, mask, ctx, catch_up, _orig=orig, _t=timed):
            t0 = time.perf_counter()
            out = _orig(tokens, positions, mask, ctx, catch_up)
            if catch_up:
                _t["catch_up_ms"] += (time.perf_counter() - t0) * 1e3
                _t["catch_ups"] += 1
                _t["rows"] += int(tokens.numel())
            return out

        d.forward_draft = forward_draft
        steps = draft_s = verify_s = new = 0
        d.text.fed_total = d.text.refed_total = 0
        for qs in (corpora.humaneval(), corpora.mtbench()):
            for q in qs[: a.n]:
                r = eng.generate(q["turns"][0], method="draft-model", method_opts={"tree": "chain", "cross": cross},
                                 chat=q.get("chat", True), max_new_tokens=128, guard=False)
                steps += r.stats.steps
                draft_s += r.stats.draft_s
                verify_s += r.stats.verify_s
                new += r.stats.new_tokens
        # the first catch-up of each prompt is the draft's prefill: leave it out of the per-step figures
        rows[cross] = {"steps": steps, "new_tokens": new, "catch_ups": timed["catch_ups"],
                       "rows_per_catch_up": timed["rows"] / max(1, timed["catch_ups"]),
                       "refed_per_catch_up": d.text.refed_total / max(1, timed["catch_ups"]),
                       "catch_up_ms_total": timed["catch_up_ms"], "draft_ms_per_step": 1e3 * draft_s / max(1, steps),
                       "verify_ms_per_step": 1e3 * verify_s / max(1, steps)}
        print(cross, json.dumps(rows[cross]))
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"model": a.model, "draft": a.draft, "n": a.n, **rows}, f, indent=1)


if __name__ == "__main__":
    main()
