#!/usr/bin/env bash
# Issue 11 numbers: EAGLE head + AdaEAGLE on qwen2.5-coder-0.5b-instruct, greedy, 64 new tokens,
# HumanEval 0-19 (fixed k = 1..6, DDD, AdaEAGLE (LDLP), AdaEAGLE-DDD, Token Recycling, prompt
# lookup) and MT-Bench first turns (LIMIT_MTBENCH, default 10: the session's CPU budget; 20 is the
# issue's target); the offline oracle comes from the k = 6
# run (benchmarks/eagle_oracle.py). Resumable: rerun to finish an interrupted run. HEAD and LDLP
# default to the cached files; missing ones are trained by the commands below (about 40 min of
# teacher forcing + 16 min of head training + 10 min of LDLP labels here).
set -euo pipefail
MODEL=qwen2.5-coder-0.5b-instruct
DIR=${DIR:-$HOME/.cache/draftwise/heads}
HEAD=${HEAD:-$DIR/qwen2.5-coder-0.5b-eagle.safetensors}
LDLP=${LDLP:-$DIR/qwen2.5-coder-0.5b-ldlp.safetensors}
OUT=${OUT:-benchmarks/results/eagle}
N_HE=${LIMIT_HUMANEVAL:-20}
N_MT=${LIMIT_MTBENCH:-10}
TOKENS=${TOKENS:-64}
[ -f "$HEAD" ] || draftwise train eagle --model $MODEL --val-every 40 --out "$HEAD"
[ -f "$LDLP" ] || draftwise train ldlp --model $MODEL --head "$HEAD" --out "$LDLP"
OPTS=$(python - "$HEAD" "$LDLP" <<'PY'
import json, sys
h, l = sys.argv[1], sys.argv[2]
o = {f"eagle/k{k}": {"head": h, "length": f"fixed:{k}"} for k in range(1, 7)}
o["eagle/ddd"] = {"head": h, "length": "ddd"}
o["eagle/ldlp"] = {"head": h, "ldlp": l, "length": "ldlp"}
o["eagle/ldlp-ddd"] = {"head": h, "ldlp": l, "length": "ldlp-ddd"}
o["eagle/untrained-k2"] = {"head": "untrained", "length": "fixed:2"}
print(json.dumps(o))
PY
)
HE=ar,eagle/k1,eagle/k2,eagle/k3,eagle/k4,eagle/k5,eagle/k6,eagle/ddd,eagle/ldlp,eagle/ldlp-ddd,recycling,lookup
MT=${METHODS_MTBENCH:-ar,eagle/k1,eagle/k2,eagle/k3,eagle/k4,eagle/k6,eagle/ddd,eagle/ldlp,eagle/ldlp-ddd}
draftwise bench --model $MODEL --threads 2 --max-turns 1 --max-new-tokens "$TOKENS" --limit "$N_HE" \
  --methods "${METHODS_HUMANEVAL:-$HE}" --method-opts "$OPTS" --dataset humaneval --out "$OUT/0.5b-humaneval"
draftwise bench --model $MODEL --threads 2 --max-turns 1 --max-new-tokens "$TOKENS" --limit "$N_MT" \
  --methods "$MT" --method-opts "$OPTS" --dataset mtbench --out "$OUT/0.5b-mtbench"
python benchmarks/eagle_costs.py --model $MODEL --head "$HEAD" --json "$OUT/costs.json"
for ds in humaneval mtbench; do
  python benchmarks/eagle_oracle.py --run "$OUT/0.5b-$ds" --costs "$OUT/costs.json" --json "$OUT/0.5b-$ds/oracle.json"
done
