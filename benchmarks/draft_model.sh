#!/usr/bin/env bash
# Issue 9 numbers: Qwen2.5-Coder-1.5B target, 0.5B draft, greedy, 128 new tokens,
# HumanEval 0-19 and 20 MT-Bench first turns; the full-vocabulary draft head on HumanEval 0-9
# (next to the same AR and default runs). Resumable: rerun to finish an interrupted run.
# About 55 + 32 + 4 min on the 2-core VM.
set -euo pipefail
M=qwen2.5-coder-1.5b-instruct
D=qwen2.5-coder-0.5b-instruct
OUT=${OUT:-benchmarks/results/draft-model-1.5b}
OPTS='{"draft-model/chain": {"tree": "chain"}, "draft-model/static": {"tree": "static"},
       "draft-model/opt6": {"max_nodes": 6}, "draft-model/full-vocab": {"vocab_subset": 0}}'
run() { draftwise bench --model $M --draft $D --method-opts "$OPTS" --max-turns 1 --max-new-tokens 128 "$@"; }
run --methods ar,draft-model,draft-model/chain,draft-model/static,draft-model/opt6,hf-assisted \
    --dataset humaneval --limit 20 --out "$OUT/humaneval"
run --methods ar,draft-model,draft-model/chain,draft-model/static,hf-assisted \
    --dataset mtbench --limit 20 --out "$OUT/mtbench"
mkdir -p "$OUT/humaneval-full-vocab"
cp "$OUT"/humaneval/{config.json,answers-ar.jsonl,answers-draft-model.jsonl} "$OUT/humaneval-full-vocab/"
run --methods ar,draft-model,draft-model/full-vocab --dataset humaneval --limit 10 --out "$OUT/humaneval-full-vocab"
