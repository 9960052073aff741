"""Draft shapes compared at equal states: at every position of a bench run's AR output, each shape
drafts from the same prefix with the draft model alone, and its accepted length is the longest
tree path that matches the known continuation (greedy verification accepts exactly that).

A bench's τ comes from each method's own trajectory: a step starts where the previous one
stopped (after a full acceptance or a correction), so two shapes visit different positions. Here
every shape sees every position once, which isolates the shape (and its p̂ ranking) from that
selection. No target forward runs: the AR answers (token ids) of the bench are the ground truth.

  python benchmarks/equal_state.py --results benchmarks/results/.../humaneval --dataset humaneval --limit 5
"""
from __future__ import annotations

import argparse
import collections
import json

import draftwise
from draftwise.corpora import balanced, load
from draftwise.drafters.base import Context
from draftwise.drafters.draft_model import DraftModel
from draftwise.sampling import Sampling
from draftwise.tree import DraftTree

SHAPES = {"chain": {"tree": "chain"}, "static": {"tree": "static"}, "opt-tree": {"tree": "opt-tree"}}


def accepted_path(tree: DraftTree, cont: list[int]) -> list[int]:
    """Node indices (root first) of the longest path whose tokens equal cont."""
    children = collections.defaultdict(list)
    for i in range(1, tree.size):
        children[int(tree.parents[i])].append(i)
    path = [0]
    while len(path) - 1 < len(cont):
        nxt = [c for c in children[path[-1]] if int(tree.tokens[c]) == cont[len(path) - 1]]
        if not nxt:
            break
        path.append(nxt[0])
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", required=True, help="a bench output folder holding answers-ar.jsonl")
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--limit", type=int, default=5)
    ap.add_argument("--draft", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--draft-weights", default="auto")
    ap.add_argument("--nodes", type=int, default=6, help="the node budget every shape gets")
    ap.add_argument("--no-calibrate", action="store_true", help="score by raw draft probabilities")
    ap.add_argument("--out", default=None, help="write the summary as JSON here")
    a = ap.parse_args()

    eng = draftwise.load(a.draft, weights=a.draft_weights, progress=False)
    sub = eng.vocab_subset(32768)
    ar = {}
    for line in open(f"{a.results}/answers-ar.jsonl"):
        d = json.loads(line)
        ar[str(d["question_id"])] = d["token_ids"][0]
    stats = {k: collections.Counter() for k in SHAPES}
    drafters = {k: DraftModel(eng.model, max_nodes=a.nodes, subset=sub, calibrate=not a.no_calibrate, **o)
                for k, o in SHAPES.items()}
    for q in balanced(load(a.dataset), a.limit):
        turn = q["turns"][0]
        prompt = eng.encode_messages([{"role": "user", "content": turn}]) if q["chat"] else eng.encode(turn)
        full = prompt + ar[str(q["question_id"])]
        for name, dm in drafters.items():
            dm.reset(Context(tokens=full[: len(prompt) + 1], sampling=Sampling(), model=eng.model))
            st = stats[name]
            for t in range(len(prompt) + 1, len(full)):
                ctx = Context(tokens=full[:t], sampling=Sampling(), model=eng.model, remaining=len(full) - t + 1)
                tree = dm.propose(ctx)
                path = accepted_path(tree, full[t:])
                st["positions"] += 1
                st["accepted"] += len(path) - 1
                st["nodes"] += tree.size - 1
                st["sum_p_hat"] += float(tree.scores[1:].sum()) if tree.scores is not None else 0.0
                dm.learn(tree, path)              # calibration only: the cache is not advanced
                dm.cache.discard()
                dm.fed = []
        print(q["question_id"], {k: round(1 + v["accepted"] / v["positions"], 3) for k, v in stats.items()}, flush=True)
    summary = {k: {"positions": v["positions"], "tau": 1 + v["accepted"] / v["positions"],
                   "mean_nodes": v["nodes"] / v["positions"], "predicted_accepted": v["sum_p_hat"] / v["positions"],
                   "accepted": v["accepted"] / v["positions"]} for k, v in stats.items()}
    for k, v in summary.items():
        print(f"{k:9s} tau {v['tau']:.3f}  accepted {v['accepted']:.3f} (predicted by sum p_hat "
              f"{v['predicted_accepted']:.3f})  nodes {v['mean_nodes']:.2f}  positions {v['positions']}")
    if a.out:
        with open(a.out, "w") as fh:
            json.dump({"args": vars(a), "summary": summary}, fh, indent=1)


if __name__ == "__main__":
    main()
