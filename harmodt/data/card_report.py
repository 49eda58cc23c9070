"""The data card's figure and markdown, drawn from the numbers of :func:`harmodt.data.card.measure`.

A task's expert is marked failing when the 95 % interval of its success rate lies below
``FAIL_BELOW`` (its upper end is under 0.95): with 20 goals 17 successes or fewer, with 50 goals 44. The
upstream Meta-World issues and pull requests on the v3 experts are listed in ``UPSTREAM``; the
card links each from its task and says whether it applies to our envs and whether this
measurement shows the failure.
"""

from __future__ import annotations

from pathlib import Path

from ..files import write_atomic

FAIL_BELOW = 0.95
REPO = "https://github.com/Farama-Foundation/Metaworld"
# task -> [(number, "issues" | "pull", what it reports, True where it applies to harmodt's envs, else False
# (the reward-function version) or why it does not)]
NOT_OURS = "harmodt's envs use the default reward function, version 2"
UPSTREAM = {
    "hand-insert-v3": [(567, "issues", "the v3 expert does not complete the task, whatever the seed", True),
                       (571, "issues", "no success reported with the experts under reward function version "
                                       "1; tied upstream to MuJoCo's changed collisions and answered by "
                                       "pinning mujoco 3.4.0", False)],
    "peg-insert-side-v3": [(569, "pull", "the v3 expert succeeds 82.4 % over 1000 episodes (a rewritten policy: 100 "
                                        "%); MuJoCo >= 3.5.0's changed collisions named as the cause", True),
                           (571, "issues", "no success reported under reward function version 1 (see hand-insert-v3)",
                            False),
                           (578, "pull", "open: MuJoCo 3.4 fixed a box-box collision bug, which broke "
                                         "peg-insert-side; explicit contact parameters on the peg would restore it "
                                         "and change the task's dynamics",
                            "harmodt pins MuJoCo 3.3.0, before 3.4's collision fix, so its peg-insert-side runs the "
                            "older contacts; the expert's misses here are the policy's, as #569 measures them; data "
                            "made with MuJoCo >= 3.4, or with the patch, is other data for this task")],
    "stick-push-v3": [(571, "issues", "no success reported under reward function version 1 (see hand-insert-v3)",
                       False)],
    "push-v3": [(514, "issues", "the push expert (v2 then) fails on newer Meta-World releases and succeeds on 0.1.0",
                 True)],
}


def wilson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of k successes in n trials (scipy)."""
    from scipy.stats import binomtest

    ci = binomtest(k, n).proportion_ci(level, method="wilson")
    return float(ci.low), float(ci.high)


def failing(p: dict) -> bool:
    return p["ci95"][1] < FAIL_BELOW


def write_figure(card: dict, path: Path) -> None:
    """Per-task expert success (bar) with its 95 % interval; failing experts in red; the curriculum's
    noise-free tail (its episodes with epsilon 0, the last 20 %) as a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = card["tasks"]
    pt = card["per_task"]
    rate = [pt[t]["success_rate"] for t in tasks]
    err = [[pt[t]["success_rate"] - pt[t]["ci95"][0] for t in tasks],
           [pt[t]["ci95"][1] - pt[t]["success_rate"] for t in tasks]]
    tail = []  # success of the curriculum's noise-free episodes (epsilon 0)
    for t in tasks:
        cur = pt[t]["curriculum"]
        last = [ok for ok, e in zip(cur["success"], cur["epsilon"]) if e == 0.0] or cur["success"][-1:]
        tail.append(sum(last) / len(last))
    colors = ["tab:red" if failing(pt[t]) else "tab:blue" for t in tasks]
    y = list(range(len(tasks)))
    fig, ax = plt.subplots(figsize=(7.5, 0.22 * len(tasks) + 1.6))
    ax.barh(y, rate, xerr=err, color=colors, ecolor="0.25", capsize=2, height=0.7)
    ax.plot(tail, y, "k.", markersize=4, label="data: the curriculum's noise-free episodes")
    ax.set_yticks(y, [t + (" *" if _applicable(t) else "") for t in tasks], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.02)
    ax.axvline(FAIL_BELOW, color="0.6", lw=0.8, ls="--")
    ax.set_xlabel(f"scripted expert success over {card['goals_per_task']} goals (error bars: 95 % Wilson interval)")
    red = plt.Rectangle((0, 0), 1, 1, color="tab:red")
    blue = plt.Rectangle((0, 0), 1, 1, color="tab:blue")
    dot = ax.get_legend_handles_labels()[0][0]
    height = fig.get_size_inches()[1]
    fig.legend([blue, red, dot], ["expert", f"failing: interval below {FAIL_BELOW}",
                                  "data: the curriculum's noise-free episodes"],
               fontsize=7, loc="lower center", ncol=3, frameon=False)
    v = card["versions"]
    ax.set_title(f"Meta-World {v['metaworld']} (MuJoCo {v['mujoco']}) scripted experts; * = upstream report",
                 fontsize=9)
    fig.tight_layout(rect=(0, 0.3 / height, 1, 1))  # room for the legend below
    fig.savefig(path.with_name(path.name + ".tmp.png"), dpi=110)
    plt.close(fig)
    Path(path.with_name(path.name + ".tmp.png")).replace(path)


def _applicable(task: str) -> list:
    """The upstream reports on ``task`` that apply to harmodt's envs."""
    return [r for r in UPSTREAM.get(task, []) if r[3] is True]


def _pct(x: float) -> str:
    return f"{100 * x:.0f} %"


def _link(number: int, kind: str) -> str:
    return f"[#{number}]({REPO}/{kind}/{number})"


def write_markdown(card: dict, path: Path, figure: str, numbers: str) -> None:
    tasks, pt, v = card["tasks"], card["per_task"], card["versions"]
    n_goals, n_cur = card["goals_per_task"], card["curriculum_episodes_per_task"]
    es = card["expert_success"]
    fails = [t for t in tasks if failing(pt[t])]
    imperfect = [t for t in tasks if pt[t]["successes"] < pt[t]["goals"] and t not in fails]
    ceiling = es["mean_of_task_rates"]
    lines = [
        f"# Meta-World v3 data card: {len(tasks)} tasks", "",
        f"Made by `{card['command']}` (any `--workers`: the numbers do not depend on it); every number is in "
        f"[{numbers}]({numbers}), per episode too.", "",
        f"Meta-World {v['metaworld']}, MuJoCo {v['mujoco']}, Gymnasium {v['gymnasium']}, NumPy {v['numpy']} "
        "(the versions requirements.txt pins).", "",
        "## The scripted experts", "",
        f"Each task's shipped scripted policy (`metaworld.policies.ENV_POLICY_MAP`, actions clipped to [-1, 1]) ran "
        f"{n_goals} noise-free episodes of 500 steps, one random goal each: the first {n_goals} resets of the task's "
        f"env built with seed `{card['expert_goal_seed']}` (seed {card['seed']}), goals apart from the training "
        "data's. Success: `info['success']` at any step, as harmodt's evaluation scores an episode. Interval: 95 % "
        "Wilson. First success: the steps taken when success is first reported, over the successful episodes.", "",
        f"Over all tasks the experts succeed in {es['successes']} of {es['episodes']} episodes "
        f"({_pct(es['rate'])}, [{es['ci95'][0]:.3f}, {es['ci95'][1]:.3f}]); the mean of the per-task rates, the "
        f"highest mean success a policy that imitates the experts can expect, is {ceiling:.3f}. "
        f"{len(tasks) - len(fails) - len(imperfect)} tasks succeed on every goal.", "",
        f"![expert success per task]({figure})", "",
    ]
    most = max((k for k in range(n_goals + 1) if wilson(k, n_goals)[1] < FAIL_BELOW), default=None)
    rule = f"; with {n_goals} goals: {most} successes or fewer" if most is not None else ""
    lines += [f"**Failing experts** (95 % interval below {FAIL_BELOW}{rule}): " + (", ".join(
        f"{t} {pt[t]['successes']}/{pt[t]['goals']}" + ("".join(" " + _link(n, k) for n, k, _, _ in _applicable(t)))
        for t in fails) or "none") + ".", ""]
    if imperfect:
        lines += ["Below 100 % but not failing: "
                  + ", ".join(f"{t} {pt[t]['successes']}/{pt[t]['goals']}" for t in imperfect) + ".", ""]
    lines += [f"Curriculum success: the success rate of the {n_cur} curriculum episodes per task of a separate "
              f"generation (`generate --episodes {n_cur} --seed {card['seed']}`, below), not of the training set"
              + (" (its own success is in *The training set*)." if card.get("training_set") else "."), "",
              "| task | expert success | 95 % interval | mean return (sd) | length | first success (mean, max) | "
              f"curriculum success ({n_cur} episodes) | upstream |", "|---|---|---|---|---|---|---|---|"]
    for t in tasks:
        p = pt[t]
        name = f"**{t}**" if t in fails else t
        first = ("never" if p["first_success_mean"] is None
                 else f"{p['first_success_mean']:.0f}, {p['first_success_max']}")
        up = " ".join(_link(n, k) for n, k, _, _ in UPSTREAM.get(t, []))
        lines.append(f"| {name} | {p['successes']}/{p['goals']} | [{p['ci95'][0]:.2f}, {p['ci95'][1]:.2f}] | "
                     f"{p['mean_return']:.0f} ({p['sd_return']:.0f}) | {p['mean_length']:.0f} | {first} | "
                     f"{p['curriculum_success_rate']:.2f} | {up} |")
    lines += ["", "## Upstream reports against this measurement", ""]
    for t, reports in UPSTREAM.items():
        for number, kind, what, applies in reports:
            if applies is not True:
                seen = f"Does not apply: {applies or NOT_OURS}"
            elif t in pt:
                p = pt[t]
                seen = ("Fails here too" if failing(p) else "Not reproduced here") + f" ({p['successes']}/{p['goals']})"
            else:
                seen = "Task not measured"
            lines.append(f"- {t}, {_link(number, kind)}: {what}. {seen}.")
    dec = card["curriculum_by_decile"]
    lines += [
        "", "## The curriculum", "",
        "`python -m harmodt.data generate` rolls out each task's expert with a random-to-expert curriculum: "
        f"{card['curriculum']} (σ = {card['sigma']}, generator version {card['generator_version']}). Measured on the "
        f"{n_cur} episodes per task that `generate --episodes {n_cur} --seed {card['seed']}` makes (the same episodes, "
        "the same code), success by decile of the episode index, pooled over the tasks:", "",
        "| decile | " + " | ".join(f"{10 * i}-{10 * i + 10} %" for i in range(10)) + " |",
        "|---|" + "---|" * 10,
        "| success | " + " | ".join(f"{d:.2f}" for d in dec) + " |", "",
        "<details><summary>per task</summary>", "",
        "| task | " + " | ".join(f"d{i + 1}" for i in range(10)) + " |", "|---|" + "---|" * 10,
    ]
    lines += [f"| {t} | " + " | ".join(f"{d:.1f}" for d in pt[t]["curriculum_by_decile"]) + " |" for t in tasks]
    lines += ["", "</details>", ""]
    lines += _training_set(card)
    lines += _comparability(card, fails, ceiling)
    write_atomic(path, "\n".join(lines) + "\n")


def _training_set(card: dict) -> list[str]:
    """The training set's own success (``card --training-data``): pooled by decile and per task."""
    ts = card.get("training_set")
    lines = ["## The training set", ""]
    if ts is None:
        return lines + ["Not measured by this card: the deciles above are of a separate generation of "
                        f"{card['curriculum_episodes_per_task']} episodes per task. `--training-data DIR` (a folder "
                        "`generate` wrote) adds the training set's own success per task and by decile.", ""]
    st = ts["settings"]
    episodes = ", ".join(map(str, ts["episodes_per_task"]))
    lines += [f"`{ts['path']}`: {episodes} episodes per task (`generate --episodes {st.get('episodes', '?')} --seed "
              f"{st.get('seed', '?')}`, generator version {st.get('generator_version', '?')}), success by decile of "
              "the episode index, pooled over the tasks:", "",
              "| decile | " + " | ".join(f"{10 * i}-{10 * i + 10} %" for i in range(10)) + " |", "|---|" + "---|" * 10,
              "| success | " + " | ".join(f"{d:.2f}" for d in ts["success_by_decile"]) + " |", "",
              "<details><summary>success per task</summary>", "", "| task | success |", "|---|---|"]
    lines += [f"| {t} | {r:.2f} |" for t, r in ts["success_rate"].items()]
    return lines + ["", "</details>", ""]


def _comparability(card: dict, fails: list[str], ceiling: float) -> list[str]:
    n = len(card["tasks"])
    fail_text = ", ".join(fails) if fails else "none"
    return [
        "## What our numbers can and cannot be compared with", "",
        "- **Across methods trained on this data: yes.** Every method of a study sees the same episodes and is scored "
        "on the same goals, so a failing expert lowers every arm alike; differences between arms are sound. A task "
        f"whose expert fails ({fail_text}) has fewer successful episodes to imitate, and methods can tie there at a "
        f"lower level; over the {n} tasks the experts' misses cost at most {1 - ceiling:.3f} of a mean success.",
        "- **Against 100 %: no.** A method that imitates these experts perfectly scores about "
        f"{ceiling:.3f} on average, not 1; read a mean success against that ceiling, and a per-task "
        "success against its expert's row above.",
        "- **Against the paper's numbers (HarmoDT, Prompt-DT, MTDT on MT50): only loosely.** The paper's data are SAC "
        "replay buffers on Meta-World v2 (not downloadable); ours are the v3 scripted experts with our curriculum, "
        "scored on v3 environments. The absolute levels differ for reasons that have nothing to do with the methods "
        "(data source, expert ceiling per task, simulator version); the sign and rough size of a difference between "
        "methods is what can be set beside the paper's.",
        "- **Against other v3 work: only with the same versions.** The experts' success depends on the MuJoCo and "
        "Meta-World versions (the upstream reports above tie failures to MuJoCo's collision changes); this card holds "
        f"for Meta-World {card['versions']['metaworld']} with MuJoCo {card['versions']['mujoco']}. Data generated with "
        "other versions, or with a fixed peg-insert-side policy, is other data.",
        "- **Against per-task results elsewhere: only where the expert succeeds.** On a failing expert's task, a low "
        "score says the data holds little success, not that the method failed to learn.",
    ]
