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
[ "${PAIR_ONLY:-0}" = 1 ] || draftwise bench --model $MODEL --weights gguf --threads 2 --max-turns 1 --max-new-tokens 128 --limit ${N_HE:-20} \
  --methods "$M" --method-opts "$OPTS" --dataset humaneval --out "$OUT/0.5b-humaneval"
[ "${PAIR_ONLY:-0}" = 1 ] || draftwise bench --model $MODEL --weights gguf --threads 2 --max-turns 1 --max-new-tokens 128 --limit ${N_MT:-10} \
  --methods "$M" --method-opts "$OPTS" --dataset mtbench --out "$OUT/0.5b-mtbench"
# RETRIEVAL=1: the datastore methods on the 0.5B's GGUF blocks (retrieval; RASD's train-free fusion with
# recycling, with and without the datastore), datastores from benchmarks/rasd.sh; N_HE / N_MT prompts.
if [ "${RETRIEVAL:-0}" = 1 ]; then
  DS=${DS_DIR:-$DIR/datastores}
  ropts() { echo "{\"retrieval\": {\"datastore\": \"$1\"}, \"rasd/trainfree\": {\"base\": \"recycling\"},
                   \"rasd/trainfree-store\": {\"base\": \"recycling\", \"datastore\": \"$1\"}}"; }
  for ds in humaneval:qwen-code mtbench:qwen-chat; do
    n=${ds%%:*}; lim=$([ "$n" = humaneval ] && echo ${N_HE:-20} || echo ${N_MT:-10})
    draftwise bench --model $MODEL --weights gguf --threads 2 --max-turns 1 --max-new-tokens 128 --limit $lim \
      --methods ar,retrieval,rasd/trainfree,rasd/trainfree-store --method-opts "$(ropts "$DS/${ds#*:}.dwds")" \
      --dataset $n --out "$OUT/0.5b-$n-retrieval"
  done
fi
# PAIR=1: the 1.5B on its GGUF blocks, with the train-free methods and the 0.5B (also GGUF blocks) as its
# draft model (chain and OPT-Tree), next to llama.cpp; N_PAIR prompts of each dataset (default 10).
if [ "${PAIR:-0}" = 1 ]; then
  P_OPTS='{"draft-model/chain": {"tree": "chain"}}'
  for ds in humaneval mtbench; do
    draftwise bench --model qwen2.5-coder-1.5b-instruct --draft qwen2.5-coder-0.5b-instruct --weights gguf --threads 2 \
      --max-turns 1 --max-new-tokens 128 --limit ${N_PAIR:-10} --method-opts "$P_OPTS" --dataset $ds \
      --methods ar,recycling,lookup,draft-model,draft-model/chain,llamacpp --out "$OUT/1.5b-$ds"
  done
fi
