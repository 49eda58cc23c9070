#!/usr/bin/env bash
# Runs (or resumes) this study on a machine with a clone of the repository at $REPO (default /work/main):
# the frozen revision 4bd0d3a in its own worktree and virtual environment, the shared MT50 data (checked
# against the manifest's content_sha256 below), and the finished runs' folders copied from runs/ (mtdt/runs/, task-id/runs/) so
# that the study skips them. Paths are the ones the runs' train_args name. Extra arguments go to the study.
# STUDY=variants (the default) is the three Prompt-DT variants beside Prompt-DT, runs in runs/; STUDY=mtdt the MTDT
# control at the same budget, runs in mtdt/runs/; STUDY=task-id adds Prompt-DT with the one-hot task ID beside its
# states to the variants' study (same out folder), its runs in task-id/runs/.
#   bash docs/results/mt50-prompt-dt/run.sh             # train and evaluate what is left
#   bash docs/results/mt50-prompt-dt/run.sh --report-only --family "..."   # (on a copy of the out folder)
#   STUDY=mtdt bash docs/results/mt50-prompt-dt/run.sh
set -euo pipefail
REPO=${REPO:-/work/main}
REV=4bd0d3a
TREE=/work/harmodt-pdt VENV=/work/venv-pdt
DATA=/work/studies/mt50data/data HERE="$REPO/docs/results/mt50-prompt-dt"
VARIANTS=(--methods prompt-dt --variant "Prompt-DT pooled=prompt-dt --state-norm pooled"
          --variant "Prompt-DT K* 20=prompt-dt --prompt-len 20" --variant "Prompt-DT first=prompt-dt --prompt-segment first")
case "${STUDY:-variants}" in
    variants) OUT=/work/studies/mt50-pdt/out RUNS=("$HERE"/runs/*/) ARMS=("${VARIANTS[@]}") ;;
    mtdt) OUT=/work/studies/mt50-pdt/out-mtdt RUNS=("$HERE"/mtdt/runs/*/) ARMS=(--methods mtdt) ;;
    task-id) OUT=/work/studies/mt50-pdt/out RUNS=("$HERE"/runs/*/ "$HERE"/task-id/runs/*/)
             ARMS=("${VARIANTS[@]}" --variant "Prompt-DT task-ID=prompt-dt --conditioning prompt-task-state") ;;
    *) echo "STUDY=${STUDY}: not a study of this page (variants, mtdt or task-id)"; exit 2 ;;
esac
SHA=c4bc524f
if [ ! -d "$TREE" ]; then git -C "$REPO" worktree add -f "$TREE" "$REV"; fi
if [ ! -x "$VENV/bin/python" ]; then
    python -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q -r "$REPO/requirements.txt"
    (cd "$TREE" && "$VENV/bin/python" -m pip install -q --no-build-isolation --no-deps -e .)
fi
if [ ! -f "$DATA/manifest.json" ]; then
    (cd "$TREE" && "$VENV/bin/python" -m harmodt.data generate --tasks MT50 --episodes 100 --seed 0 --out "$DATA")
fi
grep -q "\"content_sha256\": \"$SHA" "$DATA/manifest.json" || { echo "$DATA: not the study's data (content_sha256 $SHA...)"; exit 1; }
mkdir -p "$OUT/runs"
for run in "${RUNS[@]}"; do
    [ -d "$run" ] || continue
    name=$(basename "$run")
    [ -f "$OUT/runs/$name/run_eval.json" ] || { rm -rf "$OUT/runs/$name"; cp -r "$run" "$OUT/runs/$name"; }
done
cd "$TREE"
exec "$VENV/bin/python" -m harmodt.study --out "$OUT" --tasks MT50 --data "$DATA" "${ARMS[@]}" \
  --seeds 0,1,2 --workers "${WORKERS:-2}" --threads-per-run 1 --eval-episodes 20 --curve-episodes 5 \
  --steps 20000 --warmup-steps 1000 --lr 3e-4 --n-layer 3 --n-embd 128 --n-head 4 --eval-every 5000 \
  --checkpoint-every 500 --log-every 100 --fused --eval-stop-at-success "$@"
