#!/usr/bin/env bash
# Issue 10 numbers: retrieval, RASD and the train-free fusion. Greedy, 128 new tokens, 10 questions
# per set: HumanEval 0-9 (code datastore), 10 MT-Bench first turns (chat datastore) and 10 of the
# long-context prompts (benchmarks/data/longctx-20.jsonl, round-robin: 5 refactor + 5 document; chat
# datastore). 1.5B target + 0.5B draft for the model-based rows; the 0.5B alone for the train-free
# rows. Resumable: rerun to finish an interrupted run. About 90 min on the 2-core VM.
set -euo pipefail
DS=${DS_DIR:-$HOME/.cache/draftwise/datastores}
OUT=${OUT:-benchmarks/results/rasd}
N=${LIMIT:-10}
mkdir -p "$DS" "$OUT"
[ -f "$DS/qwen-code.dwds" ] || draftwise datastore build --model qwen2.5-coder-0.5b-instruct --input stdlib: --out "$DS/qwen-code.dwds"
[ -f "$DS/qwen-chat.dwds" ] || draftwise datastore build --model qwen2.5-coder-0.5b-instruct --input sharegpt: --out "$DS/qwen-chat.dwds"
[ -f benchmarks/data/longctx-20.jsonl ] || python benchmarks/make_longctx.py
[ -f "$OUT/datastore.json" ] || python benchmarks/datastore_bench.py --input stdlib: --input sharegpt: \
    --input "$(python -c 'import site; print(site.getsitepackages()[0])')" --max-tokens 32000000 \
    --out "$DS/big.dwds" --json "$OUT/datastore.json"
rm -f "$DS/big.dwds"

opts() {  # $1: datastore file
  cat <<JSON
{"retrieval/rest": {"datastore": "$1", "lookup": false}, "retrieval": {"datastore": "$1"},
 "rasd/store": {"datastore": "$1", "lookup": false}, "rasd/lookup": {}, "rasd": {"datastore": "$1"},
 "rasd/trainfree": {"base": "recycling"}, "rasd/trainfree-store": {"base": "recycling", "datastore": "$1"}}
JSON
}
big() { draftwise bench --model qwen2.5-coder-1.5b-instruct --draft qwen2.5-coder-0.5b-instruct --threads 2 \
          --max-turns 1 --max-new-tokens 128 --limit "$N" \
          --methods ar,draft-model,lookup,retrieval/rest,rasd/lookup,rasd/store,rasd "$@"; }
small() { draftwise bench --model qwen2.5-coder-0.5b-instruct --threads 2 --max-turns 1 --max-new-tokens 128 --limit "$N" \
          --methods ar,recycling,lookup,retrieval,rasd/trainfree,rasd/trainfree-store "$@"; }
big --dataset humaneval --method-opts "$(opts "$DS/qwen-code.dwds")" --out "$OUT/1.5b-humaneval"
big --dataset mtbench --method-opts "$(opts "$DS/qwen-chat.dwds")" --out "$OUT/1.5b-mtbench"
big --dataset benchmarks/data/longctx-20.jsonl --method-opts "$(opts "$DS/qwen-chat.dwds")" --out "$OUT/1.5b-longctx"
small --dataset humaneval --method-opts "$(opts "$DS/qwen-code.dwds")" --out "$OUT/0.5b-humaneval"
small --dataset mtbench --method-opts "$(opts "$DS/qwen-chat.dwds")" --out "$OUT/0.5b-mtbench"
small --dataset benchmarks/data/longctx-20.jsonl --method-opts "$(opts "$DS/qwen-chat.dwds")" --out "$OUT/0.5b-longctx"
