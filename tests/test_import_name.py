"""The folder kernels/ is the package harmodt_kernels, so that it never meets Hugging Face's
``kernels`` (kernels/README.md, "Import name"). Both installed side by side: ``.ci/coexist``."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# A stand-in for Hugging Face's `kernels`: a package of that name whose distribution hooks an
# egg_info writer into setuptools from `kernels.locking`, as kernels 0.17 does.
_LOCKING = '''def write_egg_lockfile(cmd, basename, filename):
    cmd.write_file(basename, filename, "written by the installed kernels package")
'''
_ENTRY_POINTS = "[egg_info.writers]\nkernels.lock = kernels.locking:write_egg_lockfile\n"


def test_the_folder_imports_under_its_package_name_only():
    ok = subprocess.run([sys.executable, "-c", "import harmodt_kernels; print(harmodt_kernels.__name__)"],
                        capture_output=True, text=True, cwd=ROOT)
    assert ok.returncode == 0 and ok.stdout.split() == ["harmodt_kernels"], ok.stderr[-2000:]
    other = subprocess.run([sys.executable, "-c", "import kernels"], capture_output=True, text=True, cwd=ROOT)
    assert other.returncode == 1
    assert other.stderr.strip().splitlines()[-1].startswith("ImportError: harmodt's kernel folder"), other.stderr[-2000:]
    assert "imported as 'kernels'; it is the package harmodt_kernels" in other.stderr


def test_setup_py_runs_the_setuptools_hook_of_an_installed_kernels_package(tmp_path):
    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("")
    (site / "kernels" / "locking.py").write_text(_LOCKING)
    dist = site / "kernels-0.17.2.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: kernels\nVersion: 0.17.2\n")
    (dist / "entry_points.txt").write_text(_ENTRY_POINTS)
    # the source root also on PYTHONPATH, ahead of the stand-in, as a developer's shell may have it
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(site)]), "HARMODT_SKIP_NATIVE": "1"}
    r = subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path)],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    info = tmp_path / "harmodt.egg-info"
    assert (info / "kernels.lock").read_text() == "written by the installed kernels package"
    assert (info / "top_level.txt").read_text().split() == ["harmodt", "harmodt_kernels"]
