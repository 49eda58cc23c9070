#!/bin/bash
# Re-train runs of the ten-seed study for 300 steps with the frozen ablation revision (killed after step 300); compare losses with the published metrics.
REPO=${REPO:-/work/harmodt-abl}; cd $REPO
export PYTHONPATH=$REPO
name=$1; shift
out=/work/studies/check/${OUTNAME:-$name}
rm -rf $out
python -m harmodt.train --tasks MT10 --data /work/studies/mt10-10/out/data --out $out --eval-episodes 10 --no-progress --threads 1 \
  --steps 10000 --warmup-steps 1000 --lr 3e-4 --n-layer 3 --n-embd 128 --n-head 4 --update-every 500 --eta-max 1600 \
  --eval-every 2500 --checkpoint-every 500 --log-every 100 "$@" > $out.log 2>&1 &
pid=$!
until grep -q '"step": 300,' $out/metrics.jsonl 2>/dev/null; do sleep 2; kill -0 $pid 2>/dev/null || break; done
kill $pid; wait $pid 2>/dev/null
python - "$name" "$out" <<'PY'
import json, sys
name = sys.argv[1]
pub = {r["step"]: r["loss"] for r in map(json.loads, open(f"/work/main/docs/results/mt10/ten-seeds/runs/{name}/metrics.jsonl")) if "loss" in r}
new = {r["step"]: r["loss"] for r in map(json.loads, open(sys.argv[2] + "/metrics.jsonl")) if "loss" in r}
for s in sorted(new):
    print(name, s, repr(new[s]), repr(pub.get(s)), "same" if new[s] == pub.get(s) else "DIFFERENT")
PY
