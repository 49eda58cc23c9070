"""README's MT50 command (data generation over the cores, HarmoDT-F 6 x 256 x 8 heads --fused, all
50 tasks evaluated), read from the README and run on the CPU at a tiny size: 1 episode per task,
3 steps with one mask update (at step 2), 1 evaluation episode per task."""

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
TINY = {"--episodes": "1", "--steps": "3", "--eval-episodes": "1", "--device": "cpu", "--workers": "2"}
EXTRA = ["--update-every", "2", "--warmup-steps", "2", "--log-every", "2", "--checkpoint-every", "3", "--no-progress"]


def readme_mt50_command() -> list[list[str]]:
    """The commands of the README's MT50 block (joined by ``&&``), each as an argument list."""
    text = README.read_text()
    block = re.search(r"\*\*MT50 at the paper's size on one GPU\.\*\*.*?```bash\n(.*?)```", text, re.S)
    assert block, "README.md has no MT50 command block"
    return [shlex.split(part) for part in block.group(1).replace("\\\n", " ").split("&&")]


def _tiny(cmd: list[str], paths: dict) -> list[str]:
    out = list(cmd)
    for flag, value in {**TINY, **paths}.items():
        if flag in out:
            out[out.index(flag) + 1] = value
    return out


def test_readme_command_has_the_papers_size_and_every_part():
    gen, train = readme_mt50_command()
    assert gen[:3] == ["python", "-m", "harmodt.data"] and "--workers" in gen and gen[gen.index("--tasks") + 1] == "MT50"
    assert train[:3] == ["python", "-m", "harmodt.train"] and "--fused" in train
    assert train[train.index("--preset") + 1] == "paper-mt50" and int(train[train.index("--eval-episodes") + 1]) > 0
    assert train[train.index("--data") + 1] == gen[gen.index("--out") + 1]


@pytest.mark.slow
def test_readme_mt50_command_runs_on_cpu(tmp_path):
    """Tens of minutes on 2 cores, about 9 GiB of memory: generating MT50 (150 episodes of 500 steps), the mask
    update at 50 tasks and the evaluation of 50 tasks x 500 steps."""
    gen, train = readme_mt50_command()
    paths = {"--out": str(tmp_path / "data")}
    for cmd, extra in ((_tiny(gen, paths), ["--no-progress"]),
                       (_tiny(train, {"--data": str(tmp_path / "data"), "--out": str(tmp_path / "run")}), EXTRA)):
        proc = subprocess.run([sys.executable, *cmd[1:], *extra], capture_output=True, text=True, timeout=3600)
        assert proc.returncode == 0, f"{cmd}\n{proc.stderr[-3000:]}"
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (cfg["model"]["n_layer"], cfg["model"]["n_embd"], cfg["model"]["n_head"]) == (6, 256, 8)
    assert cfg["fused"] is True
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert len(res["final"]["tasks"]) == 50
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("alpha" in m for m in metrics)  # a mask update at 50 tasks ran
