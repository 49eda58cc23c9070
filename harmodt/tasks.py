"""Task lists (the official HarmoDT configuration, in Meta-World v3 names) and name handling."""

from __future__ import annotations

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
TASK_SETS = {"MT5": MT5, "MT10": MT10, "MT30": MT30, "MT50": MT50}


def canonical_name(name: str) -> str:
    """Map an official '-v2' name (or a bare name) to its Meta-World v3 name."""
    name = name.strip()
    if name.endswith("-v2"):
        name = name[:-3] + "-v3"
    elif not name.endswith("-v3"):
        name = name + "-v3"
    return name


def parse_tasks(spec: str | list[str]) -> list[str]:
    """`MT5|MT10|MT30|MT50` or a comma list of task names -> list of v3 names (order kept).

    Raises ValueError naming the unknown task.
    """
    if isinstance(spec, (list, tuple)):
        names = list(spec)
    elif spec.strip().upper() in TASK_SETS:
        return list(TASK_SETS[spec.strip().upper()])
    else:
        names = [s for s in spec.split(",") if s.strip()]
    if not names:
        raise ValueError(f"no tasks in {spec!r}")
    out = []
    for n in names:
        c = canonical_name(n)
        if c not in MT50:
            raise ValueError(f"unknown task {n!r}: expected MT5, MT10, MT30, MT50 or Meta-World v3 task names")
        if c in out:
            raise ValueError(f"task {n!r} is listed twice")
        out.append(c)
    return out
