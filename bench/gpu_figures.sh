#!/usr/bin/env bash
# The GPU checks and figures of harmodt in one run, for a machine with a CUDA GPU (nothing else is
# needed beyond the requirements: no registry, no network). From the repository root:
#
#   bash bench/gpu_figures.sh            # ROUNDS=5, PYTHON=python3, output in bench/results
#   ROUNDS=3 PYTHON=python bash bench/gpu_figures.sh
#   PARTS=tests,step bash bench/gpu_figures.sh   # only parts 1 and 2 (names: tests, step, rest)
#   TESTS_ARGS="-n 8" bash bench/gpu_figures.sh  # extra pytest arguments for part 1 (here: pytest-xdist)
#
# In order of importance, each part under its own time limit (seconds: TESTS_S, GRAPH_S, REST_S),
# so that a short GPU session still gets the first parts:
#   1. tests/gpu (capture and replay of the training step against eager, the Triton ops, training
#      and evaluation on CUDA), output in <tag>-tests-gpu.txt, each failure's report written as it
#      happens to <tag>-tests-gpu-failures.txt;
#   2. the step figures: bench/test_bench_graphed.py (one CUDA graph per step against eager, wall
#      and profiler GPU time, fp32 (tf32) and bf16, HarmoDT-F and dense Prompt-DT; the MT50 x 1e6
#      projection with mask updates), bench/test_bench_launch.py (launch cost against ATen) and
#      bench/test_bench_mask_update.py (the mask update per task against batched at MT10 and MT50;
#      target: MT50 <= 0.1 s), into <tag>-graphed.json;
#   3. every other GPU benchmark (bench/ -m cuda), into <tag>-kernels-step.json.
# <tag> names the GPU and torch: e.g. nvidia-h100-80gb-hbm3-torch2.11. Render with
# `python -m bench.render --write` and name the device and versions beside every figure.
set -u -o pipefail
PY=${PYTHON:-python3}
ROUNDS=${ROUNDS:-5}
PARTS=${PARTS:-tests,step,rest}
OUT=${OUT:-bench/results}
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}.:kernels  # harmodt/ and kernels/harmodt_kernels/
export MUJOCO_GL=${MUJOCO_GL:-disable}  # evaluation renders nothing (some GPU images have no libEGL)
mkdir -p "$OUT"
tag=$($PY -c "import re, torch; n = torch.cuda.get_device_name(0).lower(); v = torch.__version__.split('+')[0]; \
print(re.sub('[^a-z0-9]+', '-', n).strip('-') + '-torch' + '.'.join(v.split('.')[:2]))" 2>/dev/null) || { echo "no CUDA device"; exit 2; }
$PY -c "import torch, triton; print('device', torch.cuda.get_device_name(0), '| torch', torch.__version__, '| triton', triton.__version__)" \
  | tee "$OUT/$tag-versions.txt"

# LIMIT LOG CMD...: CMD in a process group of its own, output into LOG; at LIMIT seconds the whole group
# is stopped (TERM, then KILL 15 s later), and whatever of it is left when CMD ends is killed, so no
# process of one part (pytest-xdist workers outlive a pytest stopped alone) runs beside the next part's timings
run_part() {
  local limit=$1 log=$2; shift 2
  setsid "$@" > "$log" 2>&1 &
  local pid=$!
  ( sleep "$limit"; echo "[gpu_figures] time limit ($limit s): stopping the part" >> "$log"; kill -TERM -- -"$pid" 2>/dev/null
    sleep 15; kill -KILL -- -"$pid" 2>/dev/null ) > /dev/null 2>&1 &
  local guard=$!
  wait "$pid"
  local rc=$?
  pkill -P "$guard" 2>/dev/null; kill "$guard" 2>/dev/null
  kill -KILL -- -"$pid" 2>/dev/null
  return $rc
}

status=0
if [[ ",$PARTS," == *",tests,"* ]]; then
  echo "== 1. tests/gpu"
  # shellcheck disable=SC2086  # TESTS_ARGS is a list of arguments
  run_part "${TESTS_S:-300}" "$OUT/$tag-tests-gpu.txt" env HARMODT_GPU_FAILURES="$OUT/$tag-tests-gpu-failures.txt" \
    $PY -m pytest tests/gpu -m cuda -q -rs --durations=10 ${TESTS_ARGS:-} || status=1
  tail -40 "$OUT/$tag-tests-gpu.txt"
fi
if [[ ",$PARTS," == *",step,"* ]]; then
  echo "== 2. the step figures"
  run_part "${GRAPH_S:-300}" "$OUT/$tag-graphed.txt" env HARMODT_BENCH_ROUNDS="$ROUNDS" HARMODT_BENCH_RESULTS="$OUT/$tag-graphed.json" \
    $PY -m pytest bench/test_bench_graphed.py bench/test_bench_launch.py bench/test_bench_mask_update.py -m cuda --benchmark-only -q -s \
    || status=1
  tail -60 "$OUT/$tag-graphed.txt"
fi
if [[ ",$PARTS," == *",rest,"* ]]; then
  echo "== 3. the other GPU benchmarks"
  run_part "${REST_S:-600}" "$OUT/$tag-kernels-step.txt" env HARMODT_BENCH_ROUNDS="$ROUNDS" HARMODT_BENCH_RESULTS="$OUT/$tag-kernels-step.json" \
    $PY -m pytest bench/ -m cuda --benchmark-only -q -s --ignore=bench/test_bench_graphed.py --ignore=bench/test_bench_launch.py \
    --ignore=bench/test_bench_mask_update.py || status=1
  tail -60 "$OUT/$tag-kernels-step.txt"
fi
ls -l "$OUT" | grep "$tag"
exit $status
