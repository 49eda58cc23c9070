"""The study's runs as submitit jobs (``--executor slurm`` or ``submitit-local``): one job per run,
each job the same :meth:`Study.execute` the local pool calls, so the plan, run folders, resume and
report are one code for every executor and a study may change executor between sittings.

- A job is a :class:`RunJob`, a ``submitit.helpers.Checkpointable``: on a time-out or preemption
  (submitit's USR2) it stops its trainer, which saves a checkpoint, and requeues itself; the
  requeued job resumes that checkpoint (``harmodt.train --resume``) and ends as an uninterrupted
  run would.
- ``OUT/jobs.json`` holds every run's job (executor, id, log, state); a job that failed shows its
  id and the last lines of its log on the console and in summary.md.
- Ctrl-C cancels the study's jobs; with ``--leave-jobs-running`` they go on, and the same command
  later collects the jobs still running instead of submitting new ones.
- ``submitit-local`` runs the jobs through submitit's LocalExecutor on this machine (``--workers``
  at a time): the Slurm path without a cluster.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import time
from pathlib import Path

from ..files import loads_json, tail_lines
from ..run.outputs import write_atomic
from .plan import Run, StudyError, read_jobs
from .unseen import evaluation_keys, unseen_mode

EXECUTORS = ("local", "slurm", "submitit-local")
# flags of --executor slurm alone
SLURM_ONLY = ("slurm_partition", "slurm_gpus_per_run", "slurm_cpus_per_run", "slurm_param")
MAX_TIMEOUTS = 20  # requeues after a time-out per job (a preemption does not count): each resumes from the checkpoint
POLL_S = 2.0
LOG_LINES = 20


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--executor", choices=EXECUTORS, default="local",
                   help="local: the runs as processes of this study, --workers at a time (default); slurm: one Slurm "
                        "job per run through submitit; submitit-local: the same jobs as processes of this machine")
    p.add_argument("--slurm-partition", default=None, help="partition of the runs' jobs (--executor slurm)")
    p.add_argument("--slurm-time", default=None, help="time limit of each job, MINUTES or [D-]HH:MM:SS (required with "
                   "--executor slurm); a job that reaches it saves its checkpoint and requeues itself")
    p.add_argument("--slurm-gpus-per-run", type=int, default=None, help="GPUs of each job (default 0)")
    p.add_argument("--slurm-cpus-per-run", type=int, default=None,
                   help="CPUs of each job (default 1); also the run's torch threads unless --threads-per-run")
    p.add_argument("--slurm-param", action="append", default=None, metavar="KEY=VALUE",
                   help="any other parameter of submitit's SlurmExecutor (account=..., qos=..., mem=16G, "
                        "constraint=...); repeatable")
    p.add_argument("--leave-jobs-running", action="store_true",
                   help="Ctrl-C leaves the jobs running (default: cancel them); the same command later collects them")


def parse_minutes(text: str) -> int:
    """``90``, ``1:30:00`` or ``2-00:00:00`` -> minutes (at least 1)."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+):(\d{1,2}):(\d{1,2})", text.strip()) if ":" in text else None
    if m:
        days, hours, minutes, seconds = (int(g or 0) for g in m.groups())
        total = days * 1440 + hours * 60 + minutes + (seconds + 59) // 60
    elif text.strip().isdigit():
        total = int(text)
    else:
        raise StudyError(f"--slurm-time must be MINUTES or [D-]HH:MM:SS, got {text!r}")
    if total < 1:
        raise StudyError(f"--slurm-time must be at least one minute, got {text!r}")
    return total


def parse_params(items: list[str]) -> dict:
    """``["qos=high", "nodes=1"]`` -> ``{"qos": "high", "nodes": 1}`` (integers as int)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"[a-z_]+", key):
            raise StudyError("--slurm-param must be KEY=VALUE with a submitit SlurmExecutor parameter as KEY, got "
                             f"{item!r}")
        out[key] = int(value) if re.fullmatch(r"-?\d+", value) else value
    return out


def check_args(args: argparse.Namespace) -> None:
    """Flags that disagree with ``--executor``, and bad values: a StudyError naming the flag."""
    for name in SLURM_ONLY:
        if getattr(args, name) is not None and args.executor != "slurm":
            raise StudyError(f"--{name.replace('_', '-')} needs --executor slurm")
    if args.slurm_time is not None and args.executor == "local":
        raise StudyError("--slurm-time needs --executor slurm or submitit-local")
    if args.leave_jobs_running and args.executor == "local":
        raise StudyError("--leave-jobs-running needs --executor slurm or submitit-local "
                         "(local runs end with the study)")
    if args.executor == "slurm" and args.slurm_time is None:
        raise StudyError("--executor slurm needs --slurm-time (each job's time limit)")
    for name in ("slurm_gpus_per_run", "slurm_cpus_per_run"):
        value = getattr(args, name)
        if value is not None and value < (1 if name == "slurm_cpus_per_run" else 0):
            raise StudyError(f"--{name.replace('_', '-')} must be at least {1 if name == 'slurm_cpus_per_run' else 0}, "
                             f"got {value}")
    if args.slurm_time is not None:
        parse_minutes(args.slurm_time)
    parse_params(args.slurm_param or [])


def make_executor(args: argparse.Namespace, folder: Path):
    """The submitit executor of ``--executor`` with the study's job parameters."""
    try:
        import submitit
    except ImportError:
        raise StudyError(f"--executor {args.executor} needs submitit: pip install 'harmodt[slurm]'") from None

    if args.executor == "submitit-local":
        executor = submitit.LocalExecutor(folder, max_num_timeout=MAX_TIMEOUTS)
        # without --slurm-time no limit (LocalExecutor's own default is two minutes)
        executor.update_parameters(timeout_min=parse_minutes(args.slurm_time) if args.slurm_time else 60 * 24 * 365,
                                   stderr_to_stdout=True)
        return executor
    try:
        executor = submitit.SlurmExecutor(folder, max_num_timeout=MAX_TIMEOUTS)
    except RuntimeError as exc:  # no srun on this machine
        raise StudyError(f"--executor slurm: {exc}") from None
    params = {"time": parse_minutes(args.slurm_time), "cpus_per_task": args.slurm_cpus_per_run or 1,
              "stderr_to_stdout": True}
    if args.slurm_partition:
        params["partition"] = args.slurm_partition
    if args.slurm_gpus_per_run:
        params["gpus_per_node"] = args.slurm_gpus_per_run
    params.update(parse_params(args.slurm_param or []))
    try:
        executor.update_parameters(**params)
    except (ValueError, TypeError) as exc:
        raise StudyError(f"--slurm-param: {str(exc).splitlines()[0]}") from None
    return executor


class RunJob:
    """One run of a study as a submitit job: builds the study from its command line in the job and
    executes the run (training with ``--resume``, then its evaluations). A checkpointable callable:
    on submitit's time-out / preemption signal it stops the run's trainer (which saves its
    checkpoint at its next step) and resubmits itself, to resume from that checkpoint."""

    def __init__(self, args: argparse.Namespace, passthrough: list[str], command: str, name: str, index: int,
                 threads: int):
        self.args, self.passthrough, self.command = args, passthrough, command
        self.name, self.index, self.threads = name, index, threads
        self.study = None  # the Study of the running job

    def __call__(self) -> bool:
        """Whether the run succeeded."""
        from .runner import Study

        self.study = Study(self.args, self.passthrough, self.command)
        self.study.threads = self.threads
        self.study.check()
        run = next(r for r in self.study.runs if r.name == self.name)
        signal.signal(signal.SIGINT, self.stop)  # a cancelled local job: its trainer saves a checkpoint and stops
        # False: the run failed, said why in the job's log (the job itself ends normally)
        return self.study.execute(run, self.index)

    def stop(self, signum, frame) -> None:
        """SIGINT: start nothing more and ask the running trainer or evaluator to stop."""
        self.study.stopping.set()
        self.study.signal_children(signal.SIGINT)

    def checkpoint(self, *args, **kwargs):
        """Stop the trainer (it saves its checkpoint) and resubmit the run: submitit requeues it."""
        import submitit

        if self.study is not None:
            self.study.stop_children()
        return submitit.helpers.DelayedSubmission(RunJob(self.args, self.passthrough, self.command, self.name,
                                                         self.index, self.threads))

    def __getstate__(self) -> dict:
        return {**self.__dict__, "study": None}  # the study's threads and locks stay in the job that made them


# ---- the jobs of a study ---------------------------------------------------------------------

def needs_job(study, run: Run) -> bool:
    """Whether ``run`` has work left: its training and evaluation, or a held-out evaluation."""
    if not run.finished():
        return True
    if not study.eval_tasks:
        return False
    mode = unseen_mode(loads_json((run.dir / "config.json").read_text()))
    return any(not run.unseen_path(t).exists() for t in evaluation_keys(mode, study.thresholds))


def _process_alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


class Jobs:
    """The submitted jobs of one sitting and OUT/jobs.json."""

    def __init__(self, study, executor):
        self.study, self.executor = study, executor
        self.path = study.out / "jobs.json"
        self.records = read_jobs(study.out)
        self.running: dict[str, object] = {}  # run name -> submitit job

    def save(self) -> None:
        write_atomic(self.path, json.dumps(self.records, indent=2))

    def record(self, name: str, job, state: str) -> None:
        self.records[name] = {"executor": self.study.args.executor, "id": str(job.job_id), "log": str(job.paths.stdout),
                              "state": state}
        if state == "failed":
            self.records[name]["tail"] = tail_lines(job.paths.stdout, LOG_LINES)
        self.save()

    def alive(self, job, force: bool = False) -> bool:
        """Whether ``job`` is still queued or running (a local job: its controller process lives; a
        Slurm job: by sacct, at most every minute unless ``force``)."""
        import submitit

        if job.paths.result_pickle.exists():
            return False
        if isinstance(job, submitit.local.local.LocalJob):
            return job._process.poll() is None if job._process is not None else _process_alive(int(job.job_id))
        return not job.done(force_check=force)

    def adopt(self, run: Run):
        """The job of ``run`` left running by an earlier sitting of this executor, or None."""
        rec = self.records.get(run.name)
        if not rec or rec.get("state") != "submitted" or rec.get("executor") != self.study.args.executor:
            return None
        job = self.executor.job_class(self.executor.folder, rec["id"])
        return job if self.alive(job, force=True) else None

    def submit(self, run: Run, index: int, threads: int):
        s = self.study
        if s.args.executor == "slurm":
            self.executor.update_parameters(job_name=f"harmodt-{run.name}")
        job = self.executor.submit(RunJob(s.args, s.passthrough, s.command, run.name, index, threads))
        self.record(run.name, job, "submitted")
        return job

    def finish(self, name: str, job) -> bool:
        """Record a job that ended; say how; whether its run succeeded."""
        import submitit

        try:
            failed = job.exception() is not None or job.result() is not True
        except submitit.core.utils.UncompletedJobError:  # ended without a result: killed, or cancelled
            failed = True
        self.record(name, job, "failed" if failed else "completed")
        if failed:
            self.study.say(f"FAIL  {name}: job {job.job_id} failed; the last lines of its log {job.paths.stdout}:\n"
                           f"{self.records[name]['tail']}")
        else:
            self.study.say(f"done  {name}: job {job.job_id} completed")
        return not failed


def run_jobs(study) -> bool:
    """Every run with work left as one job (at most ``--workers`` at a time with submitit-local, all
    at once on Slurm); wait for them; on Ctrl-C cancel them or, with ``--leave-jobs-running``,
    leave them. Whether every run succeeded."""
    study.prepare()
    args = study.args
    folder = study.out / "jobs"
    jobs = Jobs(study, make_executor(args, folder))
    threads = args.threads_per_run or ((args.slurm_cpus_per_run or 1) if args.executor == "slurm" else study.threads)
    limit = len(study.runs) if args.executor == "slurm" else args.workers
    todo, ok = [], []
    for i, run in enumerate(study.runs):
        if needs_job(study, run):
            todo.append((i + 1, run))
        else:
            study.say(f"skip  {run.name} ({i + 1}/{len(study.runs)}): already evaluated")
            ok.append(True)
    study.say(f"{len(todo)} job(s) through {args.executor}, {limit} at a time, {threads} thread(s) each; logs in "
              f"{folder}")
    t = time.perf_counter()
    try:
        for index, run in list(todo):
            job = jobs.adopt(run)
            if job is not None:
                study.say(f"collect {run.name}: job {job.job_id} of an earlier sitting is still running")
                jobs.running[run.name] = job
                todo.remove((index, run))
        while todo or jobs.running:
            while todo and len(jobs.running) < limit:
                index, run = todo.pop(0)
                job = jobs.submit(run, index, threads)
                study.say(f"submit {run.name} ({index}/{len(study.runs)}): job {job.job_id}")
                jobs.running[run.name] = job
            for name, job in list(jobs.running.items()):
                if not jobs.alive(job):
                    ok.append(jobs.finish(name, job))
                    del jobs.running[name]
            time.sleep(POLL_S)
    except KeyboardInterrupt:
        if args.leave_jobs_running:
            study.say(f"leaving {len(jobs.running)} job(s) running "
                      f"({', '.join(str(j.job_id) for j in jobs.running.values())}); "
                      "the same command collects them")
        else:
            stop(study, jobs)
        raise
    study.say(f"jobs done in {time.perf_counter() - t:.0f} s: {sum(ok)} of {len(ok)} runs evaluated")
    return all(ok)


def stop(study, jobs: Jobs, wait_s: float = 60.0) -> None:
    """Cancel the running jobs (their trainers save a checkpoint) and wait for them to end."""
    for name, job in jobs.running.items():
        job.cancel(check=False)
        jobs.record(name, job, "cancelled")
        study.say(f"cancel {name}: job {job.job_id}")
    deadline = time.time() + wait_s
    while any(jobs.alive(j) for j in jobs.running.values()) and time.time() < deadline:
        time.sleep(0.5)

