#!/bin/bash
# Device side of benchmarks/gpu_carry.py (issue 31): call k of N, run in the repo root on the lent GPU with
# carry [".gpu/common", ".gpu/pk"]. Each call stashes its part in /tmp/dw (kept while the machine stays warm)
# and runs one stage:
#   call 0        environment; the CUDA tests: the invariant kernels at full precision paths (tests/test_invariant.py
#                 on the GPU: bf16 tensor-core dots), graphs, parity, every method lossless (fp32)
#   calls 1..N-2  random-weight Qwen shapes (0.5B, then 1.5B): t(n), AR and methods for torch vs invariant
#                 kernels in bf16, outputs identical to AR counted (random weights draft little: speed only)
#   call N-1      assemble the GGUF, check its sha256, then the real model: every method, fp32 and bf16, torch
#                 and invariant kernels, HF generate beside ours
# With N = 1 the one call runs the tests and the real model. Env: LIMIT (prompts), NEW (tokens), TEST_S,
# BENCH_S (time limits, seconds), KERNELS (bf16 real-model runs), FP32 (empty: no fp32 run), METHODS (run
# labels, default all), DEVICE (cpu: a dry run of the wiring here, with KERNELS=torch).
set -u
k=${1:?call index}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:/tmp/site DRAFTWISE_CACHE=/tmp/dwcache
mkdir -p /tmp/dw "$OUT"
C=.gpu/common
[ -f $C/manifest.json ] || { echo "no $C/manifest.json: carry .gpu/common (python benchmarks/gpu_carry.py)"; exit 2; }
n=$(python3 -c "import json; print(json.load(open('$C/manifest.json'))['parts'])")
file=$(python3 -c "import json; print(json.load(open('$C/manifest.json'))['file'])")
[ -d /tmp/site/gguf ] || python3 -m pip install -q --no-index --no-deps --target /tmp/site $C/gguf-*.whl
cp .gpu/p"$k"/part* /tmp/dw/ 2>/dev/null
echo "call $k of $n: $(ls /tmp/dw/part* 2>/dev/null | wc -l) of $n parts on this machine"
filter() { grep -v "it/s\]" | grep -v "^Writing model"; }
bench() {   # label, then gpu_check.py arguments
  local label=$1; shift
  timeout "${BENCH_S:-400}" python3 benchmarks/gpu_check.py --max-new-tokens "${NEW:-128}" --limit "${LIMIT:-20}" \
    --device "${DEVICE:-cuda}" ${METHODS:+--methods $METHODS} --out "$OUT/$label" "$@" 2>&1 | filter \
    | tee "$OUT/$label.log" | tail -60
}

if [ "$k" = 0 ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
  DRAFTWISE_TEST_DEVICE=cuda timeout "${TEST_S:-200}" python3 -m pytest -q --maxfail=10 -p no:cacheprovider \
    tests/test_invariant.py tests/test_graphs.py tests/test_model_parity.py tests/test_lossless_greedy.py tests/test_core.py \
    -k "not samples and not real_weights and not another_tokenizer and not without_a_draft and not cli" \
    2>&1 | tee "$OUT/pytest-cuda.log" | tail -12
fi
if [ "$k" != 0 ] && [ "$k" != $((n - 1)) ]; then
  shapes=(qwen05 qwen15)
  s=${shapes[$(( (k - 1) % 2 ))]}
  [ -f $C/$s.json ] && bench "random-$s" --random-config $C/$s.json --prompts $C/prompts-ids.jsonl \
    --dtypes bfloat16 --kernels torch,invariant --limit "${LIMIT:-6}" --max-new-tokens "${NEW:-64}" \
    --methods "${METHODS:-auto,recycling,lookup,draft-opt-tree}"
fi
if [ "$k" = $((n - 1)) ]; then
  [ "$(ls /tmp/dw/part* | wc -l)" = "$n" ] || { echo "parts missing: the machine was not kept warm"; exit 3; }
  cat /tmp/dw/part* > "/tmp/dw/$file"
  echo "$(python3 -c "import json; print(json.load(open('$C/manifest.json'))['sha256'])")  /tmp/dw/$file" | sha256sum -c || exit 4
  bench real-bf16 --model "/tmp/dw/$file" --prompts $C/prompts.jsonl --dtypes bfloat16 --kernels "${KERNELS:-invariant,torch}"
  [ -n "${FP32-1}" ] && bench real-fp32 --model "/tmp/dw/$file" --prompts $C/prompts.jsonl --dtypes float32 --kernels torch
fi
exit 0
