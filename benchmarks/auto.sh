#!/usr/bin/env bash
# Issue 27: `auto` against every single method, and the guard on and off, on prompts the project never tuned on.
# Writes benchmarks/results/auto/<set>-<model>-run<N>/ (bench reports) and .log files.
#   SETS="humaneval mtbench longctx" RUNS="1 2" PAIR=1 OUT=benchmarks/results/auto bash benchmarks/auto.sh
# SINGLE=0 skips the 0.5B-alone runs (only the pair, with PAIR=1); PAIR_METHODS overrides the pair's method list.
# Sets: humaneval, mtbench, longctx, newcomer (13 Spec-Bench-style categories).
set -u
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin/draftwise}
OUT=${OUT:-benchmarks/results/auto}
mkdir -p $OUT
SETS=${SETS:-"humaneval mtbench longctx"}
RUNS=${RUNS:-"1 2"}
data() {
  case $1 in
    humaneval) echo "--dataset humaneval --limit 20";;
    mtbench) echo "--dataset mtbench --limit 20 --max-turns 1";;
    longctx) echo "--dataset benchmarks/data/longctx-20.jsonl";;
    newcomer) echo "--dataset benchmarks/data/specbench-style-13.jsonl";;
  esac
}
for run in $RUNS; do
  [ "${SINGLE:-1}" = 1 ] && for set in $SETS; do
    o=$OUT/$set-0.5b-run$run; rm -rf $o
    $BIN bench --model qwen2.5-coder-0.5b-instruct $(data $set) --out $o \
      --methods ar,auto,recycling,lookup,retrieval,rasd/trainfree,auto/noguard \
      --method-opts '{"rasd/trainfree": {"base": "recycling"}, "auto/noguard": {"guard": false}}' > $o.log 2>&1
  done
  if [ "${PAIR:-0}" = 1 ]; then
    for set in $SETS; do
      o=$OUT/$set-1.5b-0.5b-run$run; rm -rf $o
      $BIN bench --model qwen2.5-coder-1.5b-instruct --draft qwen2.5-coder-0.5b-instruct $(data $set) --out $o \
        --methods ${PAIR_METHODS:-ar,auto,draft-model,draft-model/chain,lookup,retrieval,auto/noguard} \
        --method-opts '{"draft-model/chain": {"tree": "chain"}, "auto/noguard": {"guard": false}}' > $o.log 2>&1
    done
  fi
done
echo done
