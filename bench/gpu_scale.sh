#!/usr/bin/env bash
# HarmoDT at the paper's scale end to end on one GPU, then a full tests/gpu run (bench/gpu.md,
# "On a GPU machine"). README's MT50 command (`--preset paper-mt50 ... --device cuda --fused`, its
# defaults otherwise) trains on generated MT50 data for as many steps as fit in a few minutes,
# twice: with the paper's mask interval (t_m 5000, the preset's) and the official code's (t_m 500), each with
# checkpoints (every 1000 steps, the default) and a final evaluation. `python -m bench.mt50_run`
# times every part and writes, under RESULTS (docs/results/mt50-gpu): tm5000.json, tm500.json
# (steps/s, seconds per mask update, per checkpoint and per evaluation, checkpoint size, peak GPU
# memory, hours per 1e6 steps, device and versions), each run's config, metric lines and results,
# README.md (the table), tests-gpu.txt.
#
#   bash bench/gpu_scale.sh                   # mt50 runs, then tests/gpu
#   PARTS=mt50 bash bench/gpu_scale.sh        # parts: mt50, tests, kernels (the kernel benchmarks)
#
# Settings (environment): PYTHON (python3), DEVICE (cuda), TASKS (MT50), EPISODES (10 curriculum
# episodes per task), STEPS (20000) at UPDATE_EVERY (5000), STEPS_OFFICIAL (5000) at UPDATE_EVERY_OFFICIAL
# (500), EVAL_EPISODES (2),
# RUN_S (240: the most seconds a run may take; at that limit it is stopped with SIGTERM, which
# saves a checkpoint and still leaves its figures), TESTS_S (300), TRAIN_EXTRA (more training flags),
# RUNS (runs/mt50-gpu), DATA (data/mt50), RESULTS (docs/results/mt50-gpu), ROUNDS (5, kernels).
# The CPU test (tests/test_bench_scripts.py) runs it with DEVICE=cpu, two tasks and a tiny model.
# Run from the repository root; a machine without a registry puts Meta-World, MuJoCo and Gymnasium
# wheels on PYTHONPATH first (shared/notes/gpu-runs.md).
set -uo pipefail

PYTHON=${PYTHON:-python3}
PARTS=${PARTS:-mt50,tests}
DEVICE=${DEVICE:-cuda}
TASKS=${TASKS:-MT50}
EPISODES=${EPISODES:-10}
STEPS=${STEPS:-20000}
STEPS_OFFICIAL=${STEPS_OFFICIAL:-5000}
UPDATE_EVERY=${UPDATE_EVERY:-5000}
UPDATE_EVERY_OFFICIAL=${UPDATE_EVERY_OFFICIAL:-500}
EVAL_EPISODES=${EVAL_EPISODES:-2}
RUN_S=${RUN_S:-240}
TESTS_S=${TESTS_S:-300}
ROUNDS=${ROUNDS:-5}
RUNS=${RUNS:-runs/mt50-gpu}
DATA=${DATA:-data/mt50}
RESULTS=${RESULTS:-docs/results/mt50-gpu}
export PYTHONPATH=.:kernels${PYTHONPATH:+:$PYTHONPATH}  # harmodt/ and kernels/harmodt_kernels/
export MUJOCO_GL=${MUJOCO_GL:-disable}
status=0
mkdir -p "$RESULTS"
echo "[gpu_scale] device $DEVICE, parts $PARTS, results in $RESULTS"

if [[ ",$PARTS," == *",mt50,"* ]]; then
  timeout 600 $PYTHON -m harmodt.data generate --tasks "$TASKS" --episodes "$EPISODES" --out "$DATA" --workers "$(nproc)" --no-progress \
    || { echo "[gpu_scale] data generation failed"; exit 1; }
  # LABEL STEPS [FLAGS...]: README's MT50 command for STEPS steps, timed part by part (a fresh run each time)
  mt50_run() {
    local label=$1 steps=$2; shift 2
    rm -rf "${RUNS:?}/$label"
    # shellcheck disable=SC2086  # TRAIN_EXTRA is a list of flags
    timeout -s TERM -k 60 "$RUN_S" $PYTHON -m bench.mt50_run --results "$RESULTS" --label "$label" -- \
      --preset paper-mt50 --data "$DATA" --quality near-optimal --out "$RUNS/$label" --device "$DEVICE" --fused \
      --steps "$steps" --eval-episodes "$EVAL_EPISODES" --no-progress --tasks "$TASKS" "$@" ${TRAIN_EXTRA:-} \
      || { echo "[gpu_scale] run $label: exit $?"; status=1; }
  }
  mt50_run "tm$UPDATE_EVERY" "$STEPS" --update-every "$UPDATE_EVERY"
  mt50_run "tm$UPDATE_EVERY_OFFICIAL" "$STEPS_OFFICIAL" --update-every "$UPDATE_EVERY_OFFICIAL"
  $PYTHON -m bench.mt50_run --results "$RESULTS" --report || status=1
fi

if [[ ",$PARTS," == *",tests,"* ]]; then
  timeout -k 15 "$TESTS_S" $PYTHON -m pytest tests/gpu -m cuda -q -rs --durations=10 -p no:cacheprovider > "$RESULTS/tests-gpu.txt" 2>&1 || status=1
  tail -5 "$RESULTS/tests-gpu.txt"
fi

if [[ ",$PARTS," == *",kernels,"* ]]; then
  tag=$($PYTHON -c "import re, torch; print(re.sub(r'[^a-z0-9]+', '-', torch.cuda.get_device_name(0).lower()).strip('-') + '-torch' + '.'.join(torch.__version__.split('+')[0].split('.')[:2]))")
  # masked_linear (train: one task and 16 mixed, tf32 and bf16; eval: MT50 shapes) against dense F.linear and the
  # reference, harmony_select at MT10/MT50, masked AdamW, the mask update at MT10 and MT50: wall, GPU and kernel time
  HARMODT_BENCH_ROUNDS=$ROUNDS HARMODT_BENCH_RESULTS=bench/results/$tag-scale-kernels.json \
    timeout 580 $PYTHON -m pytest bench/test_bench_kernels.py bench/test_bench_train.py -m cuda \
    -k "masked_linear or harmony_select or masked_adamw or mask_update" --benchmark-only -q -s -p no:cacheprovider || status=1
  $PYTHON -m bench.render bench/results/$tag-scale-kernels.json
fi
exit $status
