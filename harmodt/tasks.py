"""Task names and task sets: the official HarmoDT lists (in Meta-World v3 names), Meta-World's
held-out splits, and goal-variation tasks of one Meta-World task.

A task name is one of

* a Meta-World v3 task, ``reach-v3`` (``reach`` and the official ``reach-v2`` name map to it):
  a new random goal at every reset, the goal visible in the observation (MT50-rand);
* a goal variation, ``pick-place-v3@g7`` or ``pick-place-v3@test3``: the task with goal 7 of
  the train goals (goal 3 of the test goals) of Meta-World's own ``ML1("pick-place-v3",
  seed=ML1_SEED)`` benchmark, the same goal at every reset and hidden from the observation, as
  ML1 presents it (see :mod:`harmodt.envs`).

A task spec (``--tasks``) is a comma list of task names and set names:

* ``MT5``, ``MT10``, ``MT30``, ``MT50``: the official configuration's lists (MT10: Meta-World's);
* ``ML10-train``, ``ML10-test``, ``ML45-train``, ``ML45-test``: Meta-World's meta-learning
  splits, as ordinary (random-goal) tasks;
* ``ML1-<task>-train`` / ``ML1-<task>-test``, optionally sliced like a Python list
  (``ML1-pick-place-train[:20]``, ``ML1-pick-place-test[5:10]``): the task's 50 train or
  test goal variations.
"""

from __future__ import annotations

import re

import numpy as np

# MT50 in the order of the official config/MetaWorld/task.json; MT30 is its first 30, MT5 its first 5.
MT50 = [
    "basketball-v3", "bin-picking-v3", "button-press-topdown-v3", "button-press-v3",
    "button-press-wall-v3", "coffee-button-v3", "coffee-pull-v3", "coffee-push-v3", "dial-turn-v3",
    "disassemble-v3", "door-close-v3", "door-lock-v3", "door-open-v3", "door-unlock-v3",
    "hand-insert-v3", "drawer-close-v3", "drawer-open-v3", "faucet-open-v3", "faucet-close-v3",
    "handle-press-side-v3", "handle-press-v3", "handle-pull-side-v3", "handle-pull-v3",
    "lever-pull-v3", "peg-insert-side-v3", "pick-place-wall-v3", "pick-out-of-hole-v3", "reach-v3",
    "push-back-v3", "push-v3", "pick-place-v3", "plate-slide-v3", "plate-slide-side-v3",
    "plate-slide-back-v3", "plate-slide-back-side-v3", "soccer-v3", "push-wall-v3",
    "shelf-place-v3", "sweep-into-v3", "sweep-v3", "window-open-v3", "window-close-v3",
    "assembly-v3", "button-press-topdown-wall-v3", "hammer-v3", "peg-unplug-side-v3",
    "reach-wall-v3", "stick-push-v3", "stick-pull-v3", "box-close-v3",
]
MT30 = MT50[:30]
MT5 = MT50[:5]
# Meta-World's own MT10 (not in the official configuration).
MT10 = [
    "reach-v3", "push-v3", "pick-place-v3", "door-open-v3", "drawer-open-v3", "drawer-close-v3",
    "button-press-topdown-v3", "peg-insert-side-v3", "window-open-v3", "window-close-v3",
]
# Meta-World's ML10 and ML45 splits (metaworld.env_dict.ML10_V3 / ML45_V3, in their order).
ML10_TRAIN = [
    "reach-v3", "push-v3", "pick-place-v3", "door-open-v3", "drawer-close-v3", "button-press-topdown-v3",
    "peg-insert-side-v3", "window-open-v3", "sweep-v3", "basketball-v3",
]
ML10_TEST = ["drawer-open-v3", "door-close-v3", "shelf-place-v3", "sweep-into-v3", "lever-pull-v3"]
ML45_TEST = ["bin-picking-v3", "box-close-v3", "hand-insert-v3", "door-lock-v3", "door-unlock-v3"]
ML45_TRAIN = [
    "assembly-v3", "basketball-v3", "button-press-topdown-v3", "button-press-topdown-wall-v3", "button-press-v3",
    "button-press-wall-v3", "coffee-button-v3", "coffee-pull-v3", "coffee-push-v3", "dial-turn-v3",
    "disassemble-v3", "door-close-v3", "door-open-v3", "drawer-close-v3", "drawer-open-v3", "faucet-open-v3",
    "faucet-close-v3", "hammer-v3", "handle-press-side-v3", "handle-press-v3", "handle-pull-side-v3",
    "handle-pull-v3", "lever-pull-v3", "pick-place-wall-v3", "pick-out-of-hole-v3", "push-back-v3",
    "pick-place-v3", "plate-slide-v3", "plate-slide-side-v3", "plate-slide-back-v3",
    "plate-slide-back-side-v3", "peg-insert-side-v3", "peg-unplug-side-v3", "soccer-v3", "stick-push-v3",
    "stick-pull-v3", "push-wall-v3", "push-v3", "reach-wall-v3", "reach-v3", "shelf-place-v3",
    "sweep-into-v3", "sweep-v3", "window-open-v3", "window-close-v3",
]
TASK_SETS = {"MT5": MT5, "MT10": MT10, "MT30": MT30, "MT50": MT50, "ML10-TRAIN": ML10_TRAIN,
             "ML10-TEST": ML10_TEST, "ML45-TRAIN": ML45_TRAIN, "ML45-TEST": ML45_TEST}

# Goal variations: ML1(task, seed=ML1_SEED) draws 50 train goals with this seed and 50 test goals
# with ML1_SEED + 1, so a goal name means the same goal in every run.
ML1_SEED = 0
ML1_GOALS = 50  # goals per split (metaworld._N_GOALS)
GOAL_SPLITS = {"g": "train", "test": "test"}  # name suffix -> ML1 split
_SPLIT_CODE = {"train": 1, "test": 2}  # in task_seed and task_sort_key
_GOAL_RE = re.compile(r"(?P<base>[^@]+)@(?P<kind>g|test)(?P<index>\d+)")
_ML1_SET_RE = re.compile(r"ML1-(?P<base>.+)-(?P<split>train|test)(?:\[(?P<slice>[^\]]*)\])?", re.IGNORECASE)
# The help text of every --tasks flag.
TASKS_HELP = ("comma list of task names and sets: MT5, MT10, MT30, MT50, ML10-train/test, ML45-train/test, "
              "ML1-<task>-train/test[slice] (goal variations), v3 task names, TASK@gN, TASK@testN (README: Task names)")
_HELP = ("expected MT5, MT10, MT30, MT50, ML10-train/test, ML45-train/test, ML1-<task>-train/test[slice], "
         "Meta-World v3 task names or TASK@gN / TASK@testN")


def _v3(name: str) -> str:
    """A bare or official '-v2' Meta-World name -> its v3 name."""
    name = name.strip()
    if name.endswith("-v2"):
        return name[:-3] + "-v3"
    return name if name.endswith("-v3") else name + "-v3"


def canonical_name(name: str) -> str:
    """Map an official '-v2' name (or a bare name) to its Meta-World v3 name; a goal suffix
    (``@g7``, ``@test3``) is kept."""
    base, at, goal = name.strip().partition("@")
    return _v3(base) + at + goal.strip()


def goal_of(task: str) -> tuple[str, str | None, int | None]:
    """``(base task, ML1 split, goal index)`` of a canonical task name: ``('pick-place-v3',
    'train', 7)`` for ``pick-place-v3@g7``, ``(task, None, None)`` for a random-goal task.
    Raises ValueError naming a task that is neither."""
    m = _GOAL_RE.fullmatch(task)
    if m is None:
        if task in MT50:
            return task, None, None
        raise ValueError(f"unknown task {task!r}: {_HELP}")
    base, split, index = m["base"], GOAL_SPLITS[m["kind"]], int(m["index"])
    if base not in MT50:
        raise ValueError(f"unknown task {task!r}: {base!r} is not a Meta-World v3 task")
    if index >= ML1_GOALS:
        raise ValueError(f"unknown task {task!r}: goal index {index} out of range (ML1 has {ML1_GOALS} {split} "
                         f"goals, 0..{ML1_GOALS - 1})")
    return base, split, index


def is_task(name: str) -> bool:
    """Whether ``name`` is a canonical task name (a v3 task or one of its goal variations)."""
    try:
        goal_of(name)
    except ValueError:
        return False
    return True


def goal_name(base: str, split: str, index: int) -> str:
    """The task name of goal ``index`` of ML1 split ``split`` ('train' or 'test') of ``base``."""
    return f"{base}@{'g' if split == 'train' else 'test'}{index}"


def task_sort_key(task: str) -> tuple[int, int, int]:
    """Orders tasks as MT50 does, each task's goal variations after it (train goals first)."""
    base, split, index = goal_of(task)
    return MT50.index(base), _SPLIT_CODE.get(split, 0), -1 if index is None else index


def task_seed(seed: int, task: str) -> int:
    """The seed of a task's data-generation RNG stream and (mod 2**31) of its training episodes'
    env. A goal variation's stream is its own, apart from its base task's."""
    base, split, index = goal_of(task)
    entropy = [seed, MT50.index(base)] if split is None else [seed, MT50.index(base), _SPLIT_CODE[split], index]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def _slice(spec: str, text: str | None) -> list[int]:
    """Goal indices 0..ML1_GOALS-1 taken by a Python slice ``a:b:c`` or one index ``i``."""
    goals = list(range(ML1_GOALS))
    if text is None:
        return goals
    parts = text.split(":")
    try:
        nums = [int(p) if p.strip() else None for p in parts]
    except ValueError:
        raise ValueError(f"bad slice [{text}] in {spec!r}: expected integers as in [:20] or [5:10]") from None
    if len(nums) == 1:
        if nums[0] is None or not -ML1_GOALS <= nums[0] < ML1_GOALS:
            raise ValueError(f"bad slice [{text}] in {spec!r}: index out of range 0..{ML1_GOALS - 1}")
        return [goals[nums[0]]]
    if len(nums) > 3 or nums[2:] == [0]:
        raise ValueError(f"bad slice [{text}] in {spec!r}: expected [start:stop] or [start:stop:step] with step != 0")
    picked = goals[slice(*nums)]
    if not picked:
        raise ValueError(f"empty slice [{text}] in {spec!r}: it selects none of the {ML1_GOALS} goals")
    return picked


def _expand(item: str) -> list[str]:
    """One comma-list item -> its canonical task names."""
    key = item.strip().upper()
    if key in TASK_SETS:
        return list(TASK_SETS[key])
    m = _ML1_SET_RE.fullmatch(item.strip())
    if m:
        base = _v3(m["base"])
        if base not in MT50:
            raise ValueError(f"unknown task set {item.strip()!r}: {m['base']!r} is not a Meta-World v3 task")
        split = m["split"].lower()
        return [goal_name(base, split, i) for i in _slice(item.strip(), m["slice"])]
    name = canonical_name(item)
    try:
        goal_of(name)
    except ValueError as exc:
        raise ValueError(str(exc).replace(repr(name), repr(item.strip()), 1)) from None
    return [name]


def parse_tasks(spec: str | list[str]) -> list[str]:
    """A task spec (see the module docstring) or a list of names -> canonical task names, in
    order. Raises ValueError naming the unknown task or set, or a task listed twice."""
    items = list(spec) if isinstance(spec, (list, tuple)) else [s for s in spec.split(",") if s.strip()]
    if not items:
        raise ValueError(f"no tasks in {spec!r}")
    out: list[str] = []
    for item in items:
        for name in _expand(item):
            if name in out:
                raise ValueError(f"task {name!r} is listed twice (in {item.strip()!r})")
            out.append(name)
    return out
