#!/bin/bash
# auto with an EAGLE head as its model arm (issues 27 and 29): auto (train-free sources), auto + the EAGLE-3 head
# (chain length 1 and 2, fused with retrieval, run when it pays), the head alone at k = 1; HumanEval 0-19 and 20
# MT-Bench first turns, 128 new tokens, greedy, the default CPU path. Heads from benchmarks/eagle3.sh.
# Env: MODEL, DIR (heads), OUT, LIMIT, SETS.
set -eu
MODEL=${MODEL:-qwen2.5-coder-0.5b-instruct}
DIR=${DIR:-$HOME/.cache/draftwise/heads}
OUT=${OUT:-benchmarks/results/auto-eagle}
H="$DIR/$MODEL-eagle3.safetensors"
OPTS="{\"auto/e3-k1\": {\"head\": \"$H\"}, \"auto/e3-k2\": {\"head\": \"$H\", \"head_length\": \"fixed:2\"},
       \"eagle/e3-k1\": {\"head\": \"$H\", \"length\": \"fixed:1\"}}"
for ds in ${SETS:-humaneval mtbench}; do
  draftwise bench --model "$MODEL" --threads 2 --max-turns 1 --max-new-tokens 128 --limit "${LIMIT:-20}" \
    --methods ar,auto,auto/e3-k1,auto/e3-k2,eagle/e3-k1 --method-opts "$OPTS" --dataset "$ds" --out "$OUT/$ds"
done
