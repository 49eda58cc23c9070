"""The kernel package is the folder kernels/harmodt_kernels/; the folder kernels/ itself is no
package, so ``import kernels`` finds Hugging Face's package where it is installed, from a source
tree too. Both installed side by side: ``.ci/coexist``."""

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


def _stand_in(site: Path) -> Path:
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("STAND_IN = True\n")
    (site / "kernels" / "locking.py").write_text(_LOCKING)
    dist = site / "kernels-0.17.2.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: kernels\nVersion: 0.17.2\n")
    (dist / "entry_points.txt").write_text(_ENTRY_POINTS)
    return site


def test_a_source_tree_imports_its_own_kernel_package_and_the_installed_kernels(tmp_path):
    site = _stand_in(tmp_path / "site")
    # the source tree's two package roots first, as pytest.ini's pythonpath puts them
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "kernels"), str(site)])}
    code = "import harmodt_kernels, kernels; print(harmodt_kernels.__file__); print(kernels.__file__, kernels.STAND_IN)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    ours, theirs = r.stdout.splitlines()
    assert Path(ours) == ROOT / "kernels" / "harmodt_kernels" / "__init__.py"
    assert theirs == f"{site / 'kernels' / '__init__.py'} True"


def test_setup_py_runs_the_setuptools_hook_of_an_installed_kernels_package(tmp_path):
    site = _stand_in(tmp_path / "site")
    # the source root also on PYTHONPATH, ahead of the stand-in, as a developer's shell may have it
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(site)]), "HARMODT_SKIP_NATIVE": "1"}
    r = subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path)],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    info = tmp_path / "harmodt.egg-info"
    assert (info / "kernels.lock").read_text() == "written by the installed kernels package"
    assert (info / "top_level.txt").read_text().split() == ["harmodt", "harmodt_kernels"]
    sources = (info / "SOURCES.txt").read_text().split()
    assert {"kernels/harmodt_kernels/__init__.py", "kernels/harmodt_kernels/ops/__init__.py"} <= set(sources)
    assert not any(s.startswith("harmodt_kernels/") for s in sources)
