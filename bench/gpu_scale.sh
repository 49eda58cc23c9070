#!/usr/bin/env bash
# The GPU figures of HarmoDT at the paper's scale, in one run on a GPU machine (bench/README.md,
# "GPU scale"): the kernel benchmarks by wall, GPU and kernel time, then MT50 end to end at
# 6 x 256 x 8 heads (data generated over every core, HarmoDT-F --fused on the GPU, all 50 tasks
# evaluated batched), published under docs/results/mt50-gpu/.
#
#   bash bench/gpu_scale.sh                  # everything
#   PARTS=kernels bash bench/gpu_scale.sh    # only the kernel benchmarks (PARTS=mt50: only the run)
#
# Settings (environment): PYTHON (python3), ROUNDS (5: benchmark rounds), EPISODES (20: curriculum
# episodes per MT50 task), STEPS (5000), EVAL_EPISODES (10), OUT (runs/mt50-gpu), DATA (data/mt50),
# RESULTS (docs/results/mt50-gpu). Run from the repository root; a machine without a registry
# puts Meta-World, MuJoCo and Gymnasium wheels on PYTHONPATH first (shared/notes/gpu-runs.md).
# Each part stays well under ten minutes at these settings; the MT50 part resumes where a
# killed run stopped (the data generation reuses finished tasks, training continues from
# OUT/checkpoint.pt).
set -euo pipefail

PYTHON=${PYTHON:-python3}
PARTS=${PARTS:-kernels,mt50}
ROUNDS=${ROUNDS:-5}
EPISODES=${EPISODES:-20}
STEPS=${STEPS:-5000}
EVAL_EPISODES=${EVAL_EPISODES:-10}
OUT=${OUT:-runs/mt50-gpu}
DATA=${DATA:-data/mt50}
RESULTS=${RESULTS:-docs/results/mt50-gpu}
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
export MUJOCO_GL=${MUJOCO_GL:-disable}

tag=$($PYTHON -c "import re, torch; print(re.sub(r'[^a-z0-9]+', '-', torch.cuda.get_device_name(0).lower()).strip('-') + '-torch' + '.'.join(torch.__version__.split('+')[0].split('.')[:2]))")
echo "[gpu_scale] $tag, parts: $PARTS"

if [[ ",$PARTS," == *",kernels,"* ]]; then
  # masked_linear (train: one task and 16 mixed, tf32 and bf16; eval: MT50 shapes) against dense F.linear and the
  # reference, harmony_select at MT10/MT50, masked AdamW, the mask update at MT10 and MT50: wall, GPU and kernel time
  HARMODT_BENCH_ROUNDS=$ROUNDS HARMODT_BENCH_RESULTS=bench/results/$tag-scale-kernels.json \
    timeout 580 $PYTHON -m pytest bench/test_bench_kernels.py bench/test_bench_train.py -m cuda \
    -k "masked_linear or harmony_select or masked_adamw or mask_update" --benchmark-only -q -s -p no:cacheprovider
  $PYTHON -m bench.render bench/results/$tag-scale-kernels.json
  timeout 300 $PYTHON -m bench.memory --tasks 10,50 --device cuda --fused | tee bench/results/$tag-scale-memory.txt
fi

if [[ ",$PARTS," == *",mt50,"* ]]; then
  mkdir -p "$RESULTS"
  cmd_gen=($PYTHON -m harmodt.data generate --tasks MT50 --episodes "$EPISODES" --out "$DATA" --workers "$(nproc)" --no-progress)
  train_args=(--preset paper-mt50 --data "$DATA" --device cuda --fused --steps "$STEPS" --eval-episodes "$EVAL_EPISODES"
             --log-every 500 --checkpoint-every 1000 --out "$OUT" --no-progress)
  [[ -f "$OUT/checkpoint.pt" ]] && train_args+=(--resume --allow-changed steps)
  start=$(date +%s)
  timeout 580 "${cmd_gen[@]}"
  gen_s=$(( $(date +%s) - start ))
  nvidia-smi --query-gpu=timestamp,memory.used --format=csv -lms 1000 > "$RESULTS/nvidia-smi-memory.csv" & smi=$!
  start=$(date +%s)
  # the run under the same interpreter, then torch's peak GPU memory of the whole run
  timeout 580 $PYTHON -c "import runpy, sys, json, torch
sys.argv = ['harmodt.train'] + sys.argv[1:]
try:
    runpy.run_module('harmodt.train', run_name='__main__')
finally:
    json.dump({'max_memory_allocated_MiB': torch.cuda.max_memory_allocated() / 2**20,
               'max_memory_reserved_MiB': torch.cuda.max_memory_reserved() / 2**20}, open('$RESULTS/gpu-memory.json', 'w'))" "${train_args[@]}"
  train_s=$(( $(date +%s) - start ))
  kill $smi || true
  cp "$OUT/config.json" "$OUT/results.json" "$OUT/metrics.jsonl" "$RESULTS/"
  $PYTHON - "$RESULTS" "$gen_s" "$train_s" "$EPISODES" "${cmd_gen[*]} && $PYTHON -m harmodt.train ${train_args[*]}" <<'EOF'
import json, os, platform, statistics, subprocess, sys
import torch, triton
res, gen_s, train_s, episodes, command = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
metrics = [json.loads(line) for line in open(os.path.join(res, "metrics.jsonl"))]
sps = [m["steps_per_s"] for m in metrics if "steps_per_s" in m][1:]  # the first window holds compilation and warm-up
results = json.load(open(os.path.join(res, "results.json")))
run = {"command": command, "device": torch.cuda.get_device_name(0), "cpu_cores": os.cpu_count(), "python": platform.python_version(),
       "torch": torch.__version__, "triton": triton.__version__,
       "driver": subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True).stdout.strip(),
       "data_generation_s": gen_s, "data_task_episodes_per_s": 50 * episodes / max(gen_s, 1), "train_and_eval_s": train_s,
       "steps_per_s_median": statistics.median(sps) if sps else None, "gpu_memory": json.load(open(os.path.join(res, "gpu-memory.json"))),
       "final": results.get("final")}
json.dump(run, open(os.path.join(res, "run.json"), "w"), indent=1)
print(json.dumps({k: v for k, v in run.items() if k != "final"}, indent=1))
EOF
fi
