#!/bin/bash
# Every runnable method's speedup over the gguf-weights AR (issue 15), 0.5B, next to llama.cpp plain and
# its prompt lookup on the same GGUF file. Needs llama-cpp-python, the trained EAGLE head and exit layer
# (benchmarks/eagle.sh, benchmarks/eesd.sh make them). Resumable (the bench resumes its JSONL).
set -eu
MODEL=${MODEL:-qwen2.5-coder-0.5b-instruct}
DIR=${DRAFTWISE_CACHE:-$HOME/.cache/draftwise}
OUT=${OUT:-benchmarks/results/gguf-cpu}
OPTS="{\"eagle/k1\": {\"head\": \"$DIR/heads/qwen2.5-coder-0.5b-eagle.safetensors\", \"length\": \"fixed:1\"},
       \"early-exit\": {\"exit\": \"$DIR/exits/qwen2.5-coder-0.5b-L3.safetensors\"}}"
M=${METHODS:-ar,recycling,lookup,eagle/k1,early-exit,llamacpp,llamacpp-lookup}
draftwise bench --model $MODEL --weights gguf --threads 2 --max-turns 1 --max-new-tokens 128 --limit ${N_HE:-20} \
  --methods "$M" --method-opts "$OPTS" --dataset humaneval --out "$OUT/0.5b-humaneval"
draftwise bench --model $MODEL --weights gguf --threads 2 --max-turns 1 --max-new-tokens 128 --limit ${N_MT:-10} \
  --methods "$M" --method-opts "$OPTS" --dataset mtbench --out "$OUT/0.5b-mtbench"
