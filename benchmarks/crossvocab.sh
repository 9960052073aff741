#!/usr/bin/env bash
# Issue 30: a draft model with another tokenizer (SmolLM2-135M, 49,152 tokens) for the Qwen2.5-Coder targets
# (151,936 tokens), next to the same-tokenizer 0.5B draft, and the reverse direction (SmolLM2 target, 0.5B draft).
# Default CPU path, 128 new tokens, HumanEval 0-19 and 20 MT-Bench first turns; each run has its own AR in
# the same process. Writes benchmarks/results/crossvocab/<pair>-<set>-t<T>/ and .log files.
#   PAIRS="1.5b-smol 1.5b-0.5b 0.5b-smol smol-0.5b" SETS="humaneval mtbench" TEMPS="0 0.8" bash benchmarks/crossvocab.sh
set -u
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin/draftwise}
OUT=${OUT:-benchmarks/results/crossvocab}
mkdir -p $OUT
PAIRS=${PAIRS:-"1.5b-smol 1.5b-0.5b 0.5b-smol smol-0.5b"}
SETS=${SETS:-"humaneval mtbench"}
TEMPS=${TEMPS:-"0"}
Q15=qwen2.5-coder-1.5b-instruct; Q05=qwen2.5-coder-0.5b-instruct; SMOL=smollm2-135m-instruct
OPTS='{"draft-model/chain": {"tree": "chain"}, "draft-model/string": {"tree": "chain", "cross": "string"},
       "auto/string": {"model_cross": "string"}}'
data() {
  case $1 in
    humaneval) echo "--dataset humaneval --limit 20";;
    mtbench) echo "--dataset mtbench --limit 20 --max-turns 1";;
  esac
}
for T in $TEMPS; do
  for pair in $PAIRS; do
    case $pair in
      1.5b-smol) M=$Q15; D=$SMOL; METHODS=${CROSS_METHODS:-ar,draft-model/chain,draft-model/string,draft-model,auto,auto/string};;
      0.5b-smol) M=$Q05; D=$SMOL; METHODS=${CROSS_METHODS:-ar,draft-model/chain,draft-model/string,draft-model,auto,auto/string};;
      smol-0.5b) M=$SMOL; D=$Q05; METHODS=${CROSS_METHODS:-ar,draft-model/chain,draft-model/string};;
      1.5b-0.5b) M=$Q15; D=$Q05; METHODS=${SAME_METHODS:-ar,draft-model/chain,draft-model,auto};;
    esac
    [ "$T" != 0 ] && METHODS=$(echo $METHODS | tr ',' '\n' | grep -v '^auto' | paste -sd,)
    for set in $SETS; do
      o=$OUT/$pair-$set-t$T; rm -rf $o
      $BIN bench --model $M --draft $D $(data $set) --temperature $T --out $o --methods $METHODS \
        --method-opts "$OPTS" > $o.log 2>&1
    done
  done
done
echo done
