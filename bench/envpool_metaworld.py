"""Meta-World v3 (harmodt.envs) against EnvPool's C++ port (``MetaWorld/<Task>-v3``, envpool 1.2.5):
the scripted expert's success rate per MT10 task and the simulators' steps/s (stepping only, one thread).

    pip install envpool==1.2.5          # with its asset packages, about 500 MB
    python -m bench.envpool_metaworld --episodes 20

Both draw a random goal per episode from their own RNG (seeded here; EnvPool's goals cannot be set
to Meta-World's), so success is compared in distribution: each task's rate and its binomial
standard error. An episode ends at the task's first success (success counts any step).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings

import numpy as np


def run(sim: str, task: str, episodes: int, seed: int) -> dict:
    from harmodt.envs import ScriptedExpert, make_vector_env

    expert = ScriptedExpert(task)
    if sim == "metaworld":
        env = make_vector_env([task] * episodes, [seed + i for i in range(episodes)])
        obs, _ = env.reset(seed=None)
    else:
        import envpool
        from envpool.mujoco.metaworld.registration import metaworld_task_id

        # the goal in obs[36:39], as harmodt's MT envs show it (EnvPool hides it by default)
        env = envpool.make(metaworld_task_id(task), env_type="gymnasium", num_envs=episodes, seed=seed, num_threads=1,
                           partially_observable=False)
        obs, _ = env.reset()
    success, first, seconds, steps = np.zeros(episodes, bool), np.full(episodes, -1), 0.0, 0
    while steps < 500 and not success.all():
        act = np.stack([expert(o) for o in obs])
        t0 = time.perf_counter()
        obs, _, _, _, info = env.step(act if sim == "metaworld" else act.astype(np.float32))
        seconds += time.perf_counter() - t0
        now = np.asarray(info["success"]) > 0
        first[now & ~success] = steps
        success |= now
        steps += 1
    env.close()
    p = float(success.mean())
    return {"success": p, "stderr": float(np.sqrt(p * (1 - p) / episodes)), "steps_per_s": steps * episodes / seconds,
            "median_first_success": float(np.median(first[success])) if success.any() else None}


def main(argv=None) -> int:
    from harmodt.tasks import MT10

    p = argparse.ArgumentParser(prog="python -m bench.envpool_metaworld", description=__doc__.split("\n\n")[0])
    p.add_argument("--episodes", type=int, default=20, help="episodes per task and simulator")
    p.add_argument("--seed", type=int, default=1000)
    p.add_argument("--out", default=None, help="write the results JSON here")
    args = p.parse_args(argv)
    try:
        import envpool  # noqa: F401
    except ImportError:
        print("error: envpool is not installed (pip install envpool==1.2.5)", file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore")
    out = {}
    for task in MT10:
        out[task] = {sim: run(sim, task, args.episodes, args.seed) for sim in ("metaworld", "envpool")}
        mw, ep = out[task]["metaworld"], out[task]["envpool"]
        print(f"{task:<26} success {mw['success']:.2f} / {ep['success']:.2f} "
              f"(±{max(mw['stderr'], ep['stderr']):.2f})  "
              f"steps/s {mw['steps_per_s']:7.0f} / {ep['steps_per_s']:7.0f}  (Meta-World / EnvPool)", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
