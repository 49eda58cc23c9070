#!/usr/bin/env bash
# Runs (or resumes) this study on a machine with a clone of the repository at $REPO (default /work/main):
# the frozen revision 8ab3135 in its own worktree and virtual environment, and the finished runs' folders
# (the ten-seed study's 40 and this study's runs/) copied into the out folder so that the study skips
# them; the study generates its data in OUT/data when it is missing (bit-identity/bitid.sh checks it).
# Paths are the ones the runs' train_args name. Extra arguments go to the study.
#   bash docs/results/mt10-ablation/run.sh
set -euo pipefail
REPO=${REPO:-/work/main}
REV=8ab3135
TREE=/work/harmodt-abl VENV=/work/venv-abl
OUT=/work/studies/mt10-10/out
if [ ! -d "$TREE" ]; then git -C "$REPO" worktree add -f "$TREE" "$REV"; fi
if [ ! -x "$VENV/bin/python" ]; then
    python -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q -r "$REPO/requirements.txt"
    (cd "$TREE" && "$VENV/bin/python" -m pip install -q --no-build-isolation --no-deps -e .)
fi
mkdir -p "$OUT/runs"
for run in "$REPO"/docs/results/mt10/ten-seeds/runs/*/ "$REPO"/docs/results/mt10-ablation/runs/*/; do
    name=$(basename "$run")
    [ -f "$OUT/runs/$name/run_eval.json" ] || { rm -rf "$OUT/runs/$name"; cp -r "$run" "$OUT/runs/$name"; }
done
cd "$TREE"
exec "$VENV/bin/python" -m harmodt.study --out "$OUT" --tasks MT10 --methods mtdt,prompt-dt,harmodt-r,harmodt-s \
  --variant "HarmoDT-F official=harmodt-f --preset official --eta-max 2400" \
  --variant "Prompt-DT task-ID=prompt-dt --conditioning prompt-task-state" \
  --variant "HarmoDT-F moving=harmodt-f --preset official --eta-max 96000 --update-every 250" \
  --seeds 0,1,2,3,4,5,6,7,8,9 --workers "${WORKERS:-1}" --threads-per-run 1 \
  --eval-episodes 20 --curve-episodes 10 --gen-episodes 100 --data-seed 0 \
  --steps 10000 --warmup-steps 1000 --lr 3e-4 --n-layer 3 --n-embd 128 --n-head 4 \
  --update-every 500 --eta-max 1600 --eval-every 2500 --checkpoint-every 500 --log-every 100 "$@"
