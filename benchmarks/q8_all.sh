#!/bin/bash
# Issue 26's benchmark set for the 8-bit-activation kernels (weights gguf), in order, one process each,
# 2 threads: t(n) per ISA for both models, AR and agreement next to llama.cpp, time to first token for a
# 1,500-token prompt, and every train-free method (0.5B) and the draft model (1.5B target, 0.5B draft)
# over the new AR on HumanEval 0-19 and 20 MT-Bench first turns. Results in benchmarks/results/gguf-cpu/q8.
set -eu
OUT=${OUT:-benchmarks/results/gguf-cpu/q8}
mkdir -p "$OUT"
S=${STEPS:-tn15,bench15,ttft,m05,pair}
has() { [[ ",$S," == *",$1,"* ]]; }
has tn05 && python benchmarks/q8_tn.py qwen2.5-coder-0.5b-instruct --out "$OUT/0.5b-tn.json" > "$OUT/0.5b-tn.log" 2>&1
has tn15 && python benchmarks/q8_tn.py qwen2.5-coder-1.5b-instruct --reps 5 --out "$OUT/1.5b-tn.json" > "$OUT/1.5b-tn.log" 2>&1
has bench05 && python benchmarks/gguf_bench.py --model qwen2.5-coder-0.5b-instruct --modes gguf-f32,gguf --prompts 20 \
  --llamacpp --out "$OUT/0.5b-bench.json" > "$OUT/0.5b-bench.log" 2>&1
has bench15 && python benchmarks/gguf_bench.py --model qwen2.5-coder-1.5b-instruct --modes gguf-f32,gguf --prompts 10 \
  --reps 5 --llamacpp --out "$OUT/1.5b-bench.json" > "$OUT/1.5b-bench.log" 2>&1
if has ttft; then
  for m in qwen2.5-coder-0.5b-instruct qwen2.5-coder-1.5b-instruct; do
    python benchmarks/q8_ttft.py --model $m --reps 2 --out "$OUT/${m%-instruct}-ttft1500.json" > "$OUT/${m%-instruct}-ttft1500.log" 2>&1
  done
fi
M05=${M05:-ar,recycling,lookup,retrieval,rasd/trainfree,llamacpp,llamacpp-lookup}
if has m05; then
  for ds in ${DS05:-humaneval mtbench}; do
    draftwise bench --model qwen2.5-coder-0.5b-instruct --weights gguf --threads 2 --max-turns 1 --max-new-tokens 128 \
      --limit ${N:-20} --methods "$M05" --method-opts '{"rasd/trainfree": {"base": "recycling"}}' --dataset $ds \
      --out "$OUT/0.5b-$ds" > "$OUT/0.5b-$ds.log" 2>&1 || echo "0.5b $ds: exit $? (a mismatch is reported in its report)"
  done
fi
if has pair; then
  for ds in humaneval mtbench; do
    draftwise bench --model qwen2.5-coder-1.5b-instruct --draft qwen2.5-coder-0.5b-instruct --weights gguf --threads 2 \
      --max-turns 1 --max-new-tokens 128 --limit ${N_PAIR:-20} --method-opts '{"draft-model/chain": {"tree": "chain"}}' \
      --methods ar,recycling,lookup,draft-model,draft-model/chain,llamacpp --dataset $ds --out "$OUT/1.5b-$ds" \
      > "$OUT/1.5b-$ds.log" 2>&1 || echo "1.5b $ds: exit $? (a mismatch is reported in its report)"
  done
fi
echo ALL_DONE
