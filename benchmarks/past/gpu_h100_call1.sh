#!/bin/bash
# GPU call 1: environment, CUDA tests, random-weight benchmarks; stash GGUF part a.
export PYTHONUNBUFFERED=1
mkdir -p /tmp/dw && cp .gpu/a/part00 /tmp/dw/
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/common/gguf-*.whl
export PYTHONPATH=$PWD:/tmp/site DRAFTWISE_CACHE=/tmp/dwcache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
DRAFTWISE_TEST_DEVICE=cuda timeout 200 python3 -m pytest -q -x -p no:cacheprovider tests/test_model_parity.py tests/test_lossless_greedy.py "tests/test_sampling.py::test_end_to_end_first_sampled_tokens_match_plain_sampling" 2>&1 | tee $OUT/pytest.log | tail -15
timeout 230 python3 benchmarks/gpu_check.py --random-config .gpu/common/qwen05.json --random-config .gpu/common/qwen15.json --prompts .gpu/common/prompts.jsonl --limit 4 --out $OUT/random 2>&1 | grep -v "it/s" | tee $OUT/random.log | tail -20
ls -la /tmp/dw
