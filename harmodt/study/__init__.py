"""`python -m harmodt.study`: compare methods over seeds on one dataset, and draw the paper's figures.

Every (arm, seed[, swept value]) is one run, where an arm is a method of ``--methods`` or a labelled
``--variant "LABEL=METHOD [TRAIN FLAGS...]"`` (a method with training flags of its own, after the
shared ones): ``python -m harmodt.train ... --out DIR/runs/<name> --resume --eval-episodes 0`` in its
own process, then ``python -m harmodt.evaluate`` on its final checkpoint with the same
``--eval-seed`` for every run (the same goals for all methods). A run whose evaluation file exists
is skipped; an interrupted one resumes from its checkpoint, so a study can be spread over several
sittings. Training flags the study does not know are passed to every run.

With ``--eval-tasks``, every finished run is also evaluated on those held-out tasks: through the
voted mask of Eq. 13 at each ``--vote-thresholds`` value (HarmoDT), through the task's own prompt
(Prompt-DT); MTDT, conditioned on the task ID, is skipped with a note (see :mod:`.unseen`).

Ctrl-C (or SIGTERM) stops the study in any phase, also one started with SIGINT ignored: no run or
evaluation starts any more, running trainers save a checkpoint at their next step, running
evaluations are dropped, and the study exits 130; a second Ctrl-C stops the trainers at once.

Outputs: ``DIR/study.json`` (every run's config, per-task success and return, wall times, held-out
results), ``DIR/summary.md`` (mean success with a 95 % t-interval over seeds, the paired difference
from the baseline with a bootstrap interval over (seed, task) pairs, every pair of arms, a per-task
table, mask movement, the held-out tasks, and the command) and ``DIR/figures/*.png``, all written
atomically.

Final and best: a run's *final* success is the study's evaluation of its final checkpoint; with
``--eval-every`` its *best* is the highest mean success among the trainer's own evaluations
(``--curve-episodes`` episodes per task, the final checkpoint's included; results.json's ``best``),
as the official code reports. Both are reported, labelled; rankings use the final success.

Modules: :mod:`.plan` (arms, run names, run folders), :mod:`.runner` (the runs and signals),
:mod:`.stats`, :mod:`.report` (study.json, summary.md), :mod:`.comparisons` (pairs of arms, the
``--family``, along training), :mod:`.mask_movement`, :mod:`.against_paper` (the paper's MT50
numbers beside a study's), :mod:`.unseen`, :mod:`.figures`, :mod:`.executors` (``--executor
slurm|submitit-local``: every run a submitit job; docs/study.md) and :mod:`.__main__` (the CLI).
"""

from .plan import Arm, Run, StudyError
from .runner import Study

__all__ = ["Arm", "Run", "Study", "StudyError"]
