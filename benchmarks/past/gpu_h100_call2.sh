#!/bin/bash
# GPU call 2 (must follow call 1 on the warm machine): assemble SmolLM2 GGUF, real-weight benchmark.
export PYTHONUNBUFFERED=1
[ -f /tmp/dw/part00 ] || { echo "part a is gone: the machine was not warm"; exit 3; }
cat /tmp/dw/part00 .gpu/b/part01 .gpu/b/part02 > /tmp/dw/SmolLM2-135M-Instruct.Q4_1.gguf
echo "$(cut -d' ' -f1 .gpu/common/sha)  /tmp/dw/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c || exit 4
export PYTHONPATH=$PWD:/tmp/site DRAFTWISE_CACHE=/tmp/dwcache
timeout 400 python3 benchmarks/gpu_check.py --model /tmp/dw/SmolLM2-135M-Instruct.Q4_1.gguf --prompts .gpu/common/prompts.jsonl --limit 6 --out $OUT/smollm2 2>&1 | grep -v "it/s" | tee $OUT/smollm2.log | tail -20
