"""AdaEAGLE's offline oracle: the best draft length in hindsight, from a fixed-k run.

Greedy output is identical for every length, so the oracle takes exactly the steps of the
fixed k = K run (the same root each step): at a step that accepted a of K tokens, the oracle
drafts a (a = 0: a plain step with no head forward) and still gains a + 1 tokens. Its time is
the k = K run's measured wall time with each step's modelled cost K·c_d + t(K + 1) replaced by
a·c_d + t(a + 1) (c_d: one head forward; t: the target's pass; both from eagle_costs.py).

    python benchmarks/eagle_oracle.py --run benchmarks/results/eagle/0.5b-humaneval --costs costs.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def load(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True, help="a bench output directory with answers-ar and answers-eagle--kK")
    ap.add_argument("--costs", required=True)
    ap.add_argument("--k", type=int, default=6)
    ap.add_argument("--prefix", default="eagle--k", help="answers-PREFIX{k}.jsonl is the fixed-k run")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    c = json.loads(Path(a.costs).read_text())
    cd = c["head_step_ms_subset32k"]
    t = {int(n): ms for n, ms in c["t_target_ms"].items()}
    run = Path(a.run)
    ar = {r["question_id"]: r for r in load(run / "answers-ar.jsonl")}
    fixed = load(run / f"answers-{a.prefix}{a.k}.jsonl")
    ar_s = or_s = k_s = 0.0
    tokens = steps = 0
    accepted = []
    for r in fixed:
        ch = r["choices"][0]
        for wall, lens in zip(ch["wall_time"], ch["accept_lengths"]):
            model_k = sum(a.k * cd + t[min(a.k + 1, 8)] for _ in lens)
            model_o = sum((n - 1) * cd + t[min(n, 8)] for n in lens)
            k_s += wall
            or_s += wall - (model_k - model_o) / 1e3
            tokens += sum(lens)
            steps += len(lens)
            accepted += lens
        ar_s += sum(ar[r["question_id"]]["choices"][0]["wall_time"])
    res = {"k": a.k, "questions": len(fixed), "tokens": tokens, "steps": steps, "tau": tokens / steps,
           "ar_tok_s": tokens / ar_s, f"k{a.k}_tok_s": tokens / k_s, "oracle_tok_s": tokens / or_s,
           "oracle_speedup": ar_s / or_s, f"k{a.k}_speedup": ar_s / k_s, "head_step_ms": cd}
    print(json.dumps(res, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
