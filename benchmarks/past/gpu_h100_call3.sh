#!/bin/bash
# GPU call 3: the CLI and the bench runner (with HF baselines) on CUDA, tiny random SmolLM2-shaped model.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD DRAFTWISE_CACHE=/tmp/dwcache
python3 -m draftwise.cli generate --model .gpu/tinysmol --device cuda --method recycling --compare-ar --max-new-tokens 40 "def reverse(xs):" 2>&1 | tail -2
python3 -m draftwise.cli generate --model .gpu/tinysmol --device cuda --dtype bfloat16 --method lookup --compare-ar --max-new-tokens 40 --chat "Count to ten." 2>&1 | tail -1
python3 -m draftwise.cli generate --model .gpu/tinysmol --device cuda --temperature 0.8 --seed 1 --method recycling --max-new-tokens 30 "Once upon a time" 2>&1 | tail -1
python3 -m draftwise.cli bench --model .gpu/tinysmol --device cuda --methods ar,recycling,lookup,hf,hf-lookup --dataset .gpu/common/questions.jsonl --max-new-tokens 64 --out $OUT/bench 2>&1 | grep -v "it/s\]" | tail -12
echo "bench exit: ${PIPESTATUS[0]}"
