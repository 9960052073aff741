#!/usr/bin/env bash
# Issue 9 numbers: Qwen2.5-Coder-1.5B target, 0.5B draft, greedy, 128 new tokens,
# HumanEval 0-19 and 20 MT-Bench first turns. Resumable: rerun to finish an interrupted run.
#   WEIGHTS (target, default fp32) and DRAFT_WEIGHTS (default gguf: the draft's GGUF blocks, ~3x
#   cheaper per draft step; a draft's weights never change the output).
#   HF_FROM=DIR reuses DIR/{humaneval,mtbench}/answers-hf-assisted.jsonl instead of rerunning HF
#   assisted generation (~30 min; its ratios then cross two processes).
# About 60 min on the 2-core VM without HF assisted generation.
set -euo pipefail
M=qwen2.5-coder-1.5b-instruct
D=qwen2.5-coder-0.5b-instruct
W=${WEIGHTS:-fp32}
DW=${DRAFT_WEIGHTS:-gguf}
OUT=${OUT:-benchmarks/results/draft-model-1.5b-$W-target-$DW-draft}
OPTS='{"draft-model/chain": {"tree": "chain"}, "draft-model/static": {"tree": "static"},
       "draft-model/opt6": {"max_nodes": 6}}'
run() { draftwise bench --model $M --draft $D --weights "$W" --draft-weights "$DW" --method-opts "$OPTS" \
        --max-turns 1 --max-new-tokens 128 "$@"; }
for ds in humaneval mtbench; do
    if [ -n "${HF_FROM:-}" ]; then mkdir -p "$OUT/$ds"; cp -n "$HF_FROM/$ds/answers-hf-assisted.jsonl" "$OUT/$ds/"; fi
done
run --methods ar,draft-model,draft-model/chain,draft-model/static,draft-model/opt6,hf-assisted \
    --dataset humaneval --limit 20 --out "$OUT/humaneval"
run --methods ar,draft-model,draft-model/chain,draft-model/static,hf-assisted \
    --dataset mtbench --limit 20 --out "$OUT/mtbench"
