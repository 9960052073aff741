#!/usr/bin/env bash
# Issue 29 numbers: an EAGLE-1 head and an EAGLE-3 head for one target, trained here on the same
# teacher features (the same training tokens: 0.3M by default, ShareGPT + standard library), on the
# default CPU path; then HumanEval 0-19 and 20 MT-Bench first turns, 128 new tokens, greedy:
# fixed k, DDD, AdaEAGLE (LDLP), AdaEAGLE-DDD, an OPT-Tree of the EAGLE-3 head, and the offline
# oracle of each head's longest fixed-k run. Resumable: trained files are kept and reused.
#   MODEL (default qwen2.5-coder-0.5b-instruct), DIR (heads), TRAIN_TOKENS, EPOCHS, TTT, OUT, LIMIT
set -euo pipefail
MODEL=${MODEL:-qwen2.5-coder-0.5b-instruct}
DIR=${DIR:-$HOME/.cache/draftwise/heads}
FEAT=${FEAT:-$DIR/$MODEL.features}
TRAIN_TOKENS=${TRAIN_TOKENS:-300000}
EPOCHS=${EPOCHS:-1}
TTT=${TTT:-3}
OUT=${OUT:-benchmarks/results/eagle3}
LIMIT=${LIMIT:-20}
TOKENS=${TOKENS:-128}
H1=$DIR/$MODEL-eagle1.safetensors
H3=$DIR/$MODEL-eagle3.safetensors
mkdir -p "$DIR" "$OUT"
common=(--model "$MODEL" --features "$FEAT" --max-tokens "$TRAIN_TOKENS" --epochs "$EPOCHS" --val-every 20)
[ -f "$H3" ] || draftwise train eagle "${common[@]}" --arch eagle3 --ttt "$TTT" --out "$H3" | tee "$OUT/train-eagle3.txt"
[ -f "$H1" ] || draftwise train eagle "${common[@]}" --arch eagle1 --out "$H1" | tee "$OUT/train-eagle1.txt"
for v in 1 3; do
  H=$DIR/$MODEL-eagle$v.safetensors
  [ -f "$DIR/$MODEL-ldlp$v.safetensors" ] || draftwise train ldlp --model "$MODEL" --head "$H" \
    --out "$DIR/$MODEL-ldlp$v.safetensors" | tee "$OUT/ldlp-eagle$v.txt"
done
python - "$DIR" "$MODEL" > "$OUT/heads.json" <<'PY'
import json, sys
from safetensors import safe_open
d, m = sys.argv[1], sys.argv[2]
out = {}
for v in (1, 3):
    for kind in ("eagle", "ldlp"):
        with safe_open(f"{d}/{m}-{kind}{v}.safetensors", "pt") as f:
            out[f"{kind}{v}"] = json.loads(f.metadata()["draftwise"])
print(json.dumps(out, indent=1))
PY
OPTS=$(python - "$DIR/$MODEL" <<'PY'
import json, sys
p = sys.argv[1]
o = {}
for v, ks in ((1, (1, 2)), (3, (1, 2, 3))):
    h, l = f"{p}-eagle{v}.safetensors", f"{p}-ldlp{v}.safetensors"
    o.update({f"eagle/e{v}-k{k}": {"head": h, "length": f"fixed:{k}"} for k in ks})
    o[f"eagle/e{v}-ddd"] = {"head": h, "length": "ddd"}
    o[f"eagle/e{v}-ldlp"] = {"head": h, "ldlp": l, "length": "ldlp"}
    o[f"eagle/e{v}-ldlp-ddd"] = {"head": h, "ldlp": l, "length": "ldlp-ddd"}
o["eagle/e3-tree"] = {"head": f"{p}-eagle3.safetensors", "tree": "opt-tree", "max_nodes": 4, "max_depth": 3, "width": 2}
print(json.dumps(o))
PY
)
METHODS=${METHODS:-ar,eagle/e1-k1,eagle/e1-k2,eagle/e1-ldlp-ddd,eagle/e3-k1,eagle/e3-k2,eagle/e3-k3,eagle/e3-ddd,eagle/e3-ldlp,eagle/e3-ldlp-ddd,eagle/e3-tree}
for ds in ${SETS:-humaneval mtbench}; do
  draftwise bench --model "$MODEL" --threads 2 --max-turns 1 --max-new-tokens "$TOKENS" --limit "$LIMIT" \
    --methods "$METHODS" --method-opts "$OPTS" --dataset "$ds" --out "$OUT/$ds"
done
for v in 1 3; do
  K=$([ $v = 1 ] && echo 2 || echo 3)      # each head's longest fixed-k run: the oracle drafts at most that
  python benchmarks/eagle_costs.py --model "$MODEL" --head "$DIR/$MODEL-eagle$v.safetensors" --json "$OUT/costs-eagle$v.json"
  for ds in ${SETS:-humaneval mtbench}; do
    python benchmarks/eagle_oracle.py --run "$OUT/$ds" --costs "$OUT/costs-eagle$v.json" --k "$K" --prefix "eagle--e$v-k" \
      --json "$OUT/$ds/oracle-eagle$v.json"
  done
done
