"""`python -m harmodt.study --executor slurm|submitit-local`: every run a submitit job. The tiny study
through submitit's LocalExecutor (the planner, runner, resume and report of the Slurm path): a job
preempted mid-run requeues and resumes its checkpoint, a job whose trainer is killed fails with its
id and log in summary.md and the same command finishes it, the results equal the local pool's;
Ctrl-C cancels the jobs or leaves them running for a later call to collect. And the same study on a
real single-node Slurm started by the test (skipped where its daemons cannot start)."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harmodt.study.__main__ import main
from harmodt.study.executors import parse_minutes, parse_params
from harmodt.study.plan import StudyError
from _study import TASKS, ignoring_sigint, processes_using, write_synthetic_data

# long enough (a few seconds of steps) to signal a trainer between two checkpoints
TINY = ["--steps", "400", "--batch-size", "2", "--warmup-steps", "2", "--n-layer", "1", "--n-embd", "32", "--n-head", "2",
        "--context-len", "4", "--prompt-len", "2", "--update-every", "2", "--eta-max", "50", "--log-every", "20",
        "--checkpoint-every", "20"]


def study_cmd(data, out, methods, *extra):
    return [sys.executable, "-m", "harmodt.study", "--tasks", ",".join(TASKS), "--methods", methods, "--seeds", "0", "--out", str(out),
            "--data", str(data), "--eval-episodes", "1", "--eval-seed", "7", "--threads-per-run", "1", *TINY, *extra]


def run_results(out) -> dict:
    """Every run's evaluation and final weights, keyed by run name."""
    import torch

    found = {}
    for run in sorted((out / "runs").iterdir()):
        ck = torch.load(run / "checkpoint.pt", weights_only=False)
        found[run.name] = (json.loads((run / "run_eval.json").read_text()), ck["model"])
    return found


def assert_same_results(a: dict, b: dict) -> None:
    import torch

    assert a.keys() == b.keys()
    for name in a:
        assert a[name][0] == b[name][0], name
        assert a[name][1].keys() == b[name][1].keys()
        for k in a[name][1]:
            assert torch.equal(a[name][1][k], b[name][1][k]), (name, k)


def pids(pattern: str, *needles: str) -> list[int]:
    """Processes whose command line holds ``pattern`` and every needle."""
    found = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                cmd = open(f"/proc/{d}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if pattern in cmd and all(n in cmd for n in needles):
                found.append(int(d))
    return found


def parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def wait_for(cond, what: str, timeout: float = 150, poll: float = 0.05):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"no {what} in {timeout} s")


def mid_training(run_dir: Path) -> bool:
    return (run_dir / "checkpoint.pt").exists() and not (run_dir / "results.json").exists()


# ---- flags ---------------------------------------------------------------------------------

@pytest.mark.parametrize("extra,needle", [
    (["--executor", "slurm"], "--executor slurm needs --slurm-time"),
    (["--executor", "slurm", "--slurm-time", "1:2"], "--slurm-time must be"),
    (["--slurm-partition", "gpu"], "--slurm-partition needs --executor slurm"),
    (["--executor", "submitit-local", "--slurm-gpus-per-run", "1"], "--slurm-gpus-per-run needs --executor slurm"),
    (["--leave-jobs-running"], "--leave-jobs-running needs"),
    (["--executor", "slurm", "--slurm-time", "5", "--slurm-param", "qos"], "--slurm-param must be KEY=VALUE"),
    (["--executor", "slurm", "--slurm-time", "5", "--slurm-cpus-per-run", "0"], "--slurm-cpus-per-run must be at least 1"),
])
def test_bad_executor_flags_are_one_line_errors(tmp_path, capsys, extra, needle):
    assert main(["--out", str(tmp_path / "s"), "--tasks", ",".join(TASKS), "--methods", "prompt-dt", "--seeds", "0", *extra]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "s").exists()


def test_time_and_param_parsing():
    assert parse_minutes("90") == 90 and parse_minutes("1:30:00") == 90 and parse_minutes("2-01:00:30") == 2 * 1440 + 61
    assert parse_params(["qos=high", "nodes=1", "mem=16G"]) == {"qos": "high", "nodes": 1, "mem": "16G"}
    for bad in ("", "0", "1h", "1:00"):
        with pytest.raises(StudyError):
            parse_minutes(bad)


# ---- the tiny study through submitit's LocalExecutor ---------------------------------------------

@pytest.mark.long
def test_preempted_and_failed_jobs_resume_to_the_local_pools_results(tmp_path):
    """First sitting: harmodt-f-s0's job gets submitit's preemption signal mid-training (it saves,
    requeues and resumes in a new job process), prompt-dt-s0's trainer is killed (its job fails:
    id and log tail on the console and in summary.md). Second sitting: the same command resumes
    prompt-dt-s0. Both runs then equal the local pool's uninterrupted runs, bit for bit."""
    data = write_synthetic_data(tmp_path / "data")
    ref = tmp_path / "local"
    proc = subprocess.run(study_cmd(data, ref, "prompt-dt,harmodt-f", "--workers", "2"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    out = tmp_path / "jobs"
    cmd = study_cmd(data, out, "prompt-dt,harmodt-f", "--workers", "2", "--executor", "submitit-local")
    log_path = tmp_path / "sitting1.log"
    with open(log_path, "w") as log:
        study = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        hf, pd = out / "runs" / "harmodt-f-s0", out / "runs" / "prompt-dt-s0"
        wait_for(lambda: mid_training(hf) and mid_training(pd), "checkpoint of both runs")
        jobs = json.loads((out / "jobs.json").read_text())
        worker = wait_for(lambda: [p for p in pids("submitit.core._submit", str(out)) if parent(p) == int(jobs["harmodt-f-s0"]["id"])],
                          "job process of harmodt-f-s0")[0]
        os.kill(worker, signal.SIGUSR2)  # what Slurm sends before a time-out or preemption
        os.kill(wait_for(lambda: pids("harmodt.train", str(pd)), "prompt-dt trainer")[0], signal.SIGKILL)
        assert study.wait(timeout=300) == 1
    first = log_path.read_text()
    pd_id = jobs["prompt-dt-s0"]["id"]
    assert f"FAIL  prompt-dt-s0: job {pd_id} failed" in first and "training exited -9" in first, first
    assert "done  harmodt-f-s0" in first, first
    summary = (out / "summary.md").read_text()
    assert f"Run prompt-dt-s0: job {pd_id} (submitit-local) failed" in summary and "training exited -9" in summary, summary
    hf_log = Path(json.loads((out / "jobs.json").read_text())["harmodt-f-s0"]["log"]).read_text()
    assert "this job is preempted" in hf_log and "Requeued job" in hf_log, hf_log
    assert (hf / "train.log").read_text().count("$ python -m harmodt.train") == 2  # the requeued job resumed the run
    assert "resumed from" in (hf / "train.log").read_text().split("$ python -m harmodt.train")[2]

    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "skip  harmodt-f-s0" in proc.stdout and "submit prompt-dt-s0" in proc.stdout
    study_json = json.loads((out / "study.json").read_text())
    assert study_json["complete"] and study_json["failed_jobs"] == []
    assert "(submitit-local) failed" not in (out / "summary.md").read_text()
    assert_same_results(run_results(out), run_results(ref))
    assert processes_using(out) == []


@pytest.mark.long
def test_ctrl_c_cancels_the_jobs_or_leaves_them_for_the_next_call(tmp_path):
    """Ctrl-C cancels the running job (its trainer saves and stops; no process is left). With
    --leave-jobs-running the job goes on after the study exits, and the same command collects it
    instead of submitting the run again."""
    data = write_synthetic_data(tmp_path / "data")
    out = tmp_path / "study"
    run_dir = out / "runs" / "prompt-dt-s0"
    cmd = study_cmd(data, out, "prompt-dt", "--executor", "submitit-local")

    def interrupted(cmd, log_path):
        with open(log_path, "w") as log:  # a file, not a pipe: a job left running would hold a pipe open
            study = subprocess.Popen(ignoring_sigint(cmd), stdout=log, stderr=subprocess.STDOUT)
            wait_for(lambda: mid_training(run_dir) and pids("harmodt.train", str(run_dir)), "trainer past its first checkpoint")
            study.send_signal(signal.SIGINT)
            assert study.wait(timeout=150) == 130
        return log_path.read_text()

    log = interrupted(cmd, tmp_path / "cancel.log")
    job_id = json.loads((out / "jobs.json").read_text())["prompt-dt-s0"]["id"]
    assert f"cancel prompt-dt-s0: job {job_id}" in log and "interrupted" in log, log
    assert json.loads((out / "jobs.json").read_text())["prompt-dt-s0"]["state"] == "cancelled"
    wait_for(lambda: processes_using(out) == [], "end of every process", timeout=60)
    assert not (run_dir / "run_eval.json").exists()

    log = interrupted([*cmd, "--leave-jobs-running"], tmp_path / "leave.log")
    left = json.loads((out / "jobs.json").read_text())["prompt-dt-s0"]
    assert left["state"] == "submitted" and left["id"] != job_id
    assert f"leaving 1 job(s) running ({left['id']})" in log and "cancel prompt-dt-s0" not in log, log
    assert processes_using(out)  # the job goes on without the study

    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"collect prompt-dt-s0: job {left['id']}" in proc.stdout and "submit " not in proc.stdout, proc.stdout
    assert json.loads((out / "jobs.json").read_text())["prompt-dt-s0"] == {**left, "state": "completed"}
    assert json.loads((out / "study.json").read_text())["complete"]
    train_log = (run_dir / "train.log").read_text()
    assert train_log.count("$ python -m harmodt.train") == 2 and "resumed from" in train_log.split("$ python -m harmodt.train")[2]
    assert processes_using(out) == []


# ---- a real Slurm ------------------------------------------------------------------------------

SLURM_CONF = """ClusterName=harmodt-test
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={dir}/munge.sock
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=harmodt Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def slurm_cluster(tmp_path_factory):
    """munged, slurmctld and slurmd on this machine from a config in a temporary folder; the
    environment (SLURM_CONF) that points Slurm's commands at it. Skips where they cannot start."""
    missing = [c for c in ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "srun", "sinfo") if shutil.which(c) is None]
    if missing:
        pytest.skip(f"no Slurm on this machine (missing {', '.join(missing)}; apt-get install slurm-wlm munge)")
    if os.geteuid() != 0:
        pytest.skip("starting slurmd needs root")
    d = tmp_path_factory.mktemp("slurm")
    (d / "state").mkdir()
    (d / "spool").mkdir()
    conf = d / "slurm.conf"
    conf.write_text(SLURM_CONF.format(host=socket.gethostname(), ctld_port=free_port(), d_port=free_port(), dir=d,
                                      cpus=os.cpu_count() or 1))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    started = []
    try:
        for cmd in ([shutil.which("mungekey"), "-c", "-k", str(d / "munge.key")],
                    [shutil.which("munged"), "--force", f"--socket={d}/munge.sock", f"--key-file={d}/munge.key",
                     f"--pid-file={d}/munged.pid", f"--log-file={d}/munged.log", f"--seed-file={d}/munge.seed"],
                    [shutil.which("slurmctld"), "-f", str(conf)],
                    [shutil.which("slurmd"), "-f", str(conf), "-N", "localhost"]):
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
            if proc.returncode != 0:
                pytest.skip(f"Slurm's daemons did not start ({Path(cmd[0]).name} exited {proc.returncode}: "
                            f"{(proc.stderr or proc.stdout).strip()[-200:]})")
            if cmd[0].endswith("mungekey"):
                os.chmod(d / "munge.key", 0o400)
            else:
                started.append(d / f"{Path(cmd[0]).name}.pid")
        deadline = time.time() + 60
        while "idle" not in subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, env=env).stdout:
            if time.time() > deadline:
                pytest.skip("Slurm's node did not become idle in 60 s (see slurmd.log)")
            time.sleep(0.5)
        yield env
    finally:
        for pid_file in reversed(started):  # slurmd, slurmctld, munged: each by the pid it wrote
            try:
                pid = int(pid_file.read_text())
                os.kill(pid, signal.SIGTERM)
                wait_for(lambda: not Path(f"/proc/{pid}").exists(), f"end of {pid_file.stem}", timeout=30, poll=0.2)
            except (OSError, ValueError):
                pass


@pytest.mark.slurm
def test_the_tiny_study_on_slurm_equals_the_local_pool(tmp_path, slurm_cluster):
    data = write_synthetic_data(tmp_path / "data")
    ref = tmp_path / "local"
    proc = subprocess.run(study_cmd(data, ref, "prompt-dt,harmodt-f", "--workers", "2"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "slurm"
    cmd = study_cmd(data, out, "prompt-dt,harmodt-f", "--executor", "slurm", "--slurm-time", "10", "--slurm-partition", "harmodt",
                    "--slurm-cpus-per-run", "1")
    with open(tmp_path / "study.log", "w") as log:
        study = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=slurm_cluster)
        hf = out / "runs" / "harmodt-f-s0"
        wait_for(lambda: mid_training(hf), "checkpoint of harmodt-f-s0", timeout=300)
        job_id = json.loads((out / "jobs.json").read_text())["harmodt-f-s0"]["id"]
        # what Slurm sends a job before its time limit: the job saves, requeues itself (scontrol requeue) and resumes
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True, env=slurm_cluster)
        code = study.wait(timeout=400)
    output = (tmp_path / "study.log").read_text()
    print(output)
    assert code == 0, output[-3000:]
    jobs = json.loads((out / "jobs.json").read_text())
    assert {r["executor"] for r in jobs.values()} == {"slurm"} and {r["state"] for r in jobs.values()} == {"completed"}
    for name, rec in jobs.items():
        assert f"submit {name} " in output and f": job {rec['id']}" in output
        assert f"JobEnvironment(job_id={rec['id']}," in Path(rec["log"]).read_text()
    train_log = (hf / "train.log").read_text()
    print(train_log)
    assert train_log.count("$ python -m harmodt.train") == 2 and "resumed from" in train_log.split("$ python -m harmodt.train")[2]
    assert json.loads((out / "study.json").read_text())["complete"]
    assert_same_results(run_results(out), run_results(ref))
