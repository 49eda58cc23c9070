"""The trees of bench/bit_identity.py: git worktrees of revisions, each tree's Python environment
(its own harmodt and harmodt_kernels, checked by a probe), its native library and the shared data."""

from __future__ import annotations

import configparser
import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

LIB_NAME = "libharmodt_kernels.so"
NATIVE_SUFFIXES = (".cpp", ".cc", ".h", ".hpp", ".cu", ".cuh")
TASKS = ("reach-v3", "push-v3", "door-open-v3")

_PROBE = r"""
import json, pathlib
import harmodt, harmodt_kernels
info = {"harmodt": str(pathlib.Path(harmodt.__file__).resolve()),
        "kernels": str(pathlib.Path(harmodt_kernels.__file__).resolve().parent), "methods": None}
try:
    from harmodt.methods import METHODS
    info["methods"] = list(METHODS)
except (ImportError, AttributeError):
    pass
print(json.dumps(info))
"""

_WRITE_DATA = r"""
import sys
sys.path.insert(0, "tests")
from _data_folders import write_ours
write_ours(sys.argv[1], tasks=tuple(sys.argv[2].split(",")), episodes=4, prompts=2, length=20, seed=0)
"""


class UsageError(Exception):
    """A bad flag value, revision or method: exit status 2."""


class SetupError(Exception):
    """A tree that cannot be made ready (git, imports, native library, data): exit status 1."""


@dataclass(eq=False)
class Tree:
    """One side of the comparison: a directory with harmodt, how to run Python in it, what it has."""
    label: str
    root: Path
    env: dict = field(repr=False)
    kernels: Path | None = None  # the kernel package's folder, from the probe
    methods: list | None = None
    native: str = ""  # how it got its native library

    @property
    def lib(self) -> Path:
        return self.kernels / "_lib" / LIB_NAME


def git(*args, cwd: Path) -> str:
    proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SetupError(f"git {' '.join(args)} in {cwd}: {last_line(proc.stderr)}")
    return proc.stdout.strip()


def resolve_revision(repo: Path, rev: str, flag: str) -> str:
    proc = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"], cwd=repo,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        what = "neither a directory nor a revision" if flag == "--candidate" else "not a revision"
        raise UsageError(f"{flag} {rev!r} is {what} of {repo}")
    return proc.stdout.strip()


def add_worktree(repo: Path, commit: str, dest: Path) -> Path:
    git("worktree", "add", "--detach", str(dest), commit, cwd=repo)
    return dest


def remove_worktree(repo: Path, dest: Path):
    subprocess.run(["git", "worktree", "remove", "--force", str(dest)], cwd=repo, capture_output=True)
    shutil.rmtree(dest, ignore_errors=True)
    subprocess.run(["git", "worktree", "prune"], cwd=repo, capture_output=True)


def pytest_pythonpath(root: Path) -> list[Path]:
    """The folders pytest.ini's ``pythonpath`` puts on sys.path (where a tree keeps importable packages)."""
    ini = root / "pytest.ini"
    if not ini.is_file():
        return []
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(ini)
    entries = parser.get("pytest", "pythonpath", fallback="").split()
    return [(root / e).resolve() for e in entries]


def tree_env(root: Path) -> dict:
    paths = [root.resolve(), *pytest_pythonpath(root)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(dict.fromkeys(str(p) for p in paths)), OMP_NUM_THREADS="1",
               MKL_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    env.pop("HARMODT_KERNELS_LIB", None)  # each tree loads its own library
    return env


def run_python(tree: Tree, args: list, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=tree.root, env=tree.env, capture_output=True, text=True,
                          timeout=timeout)


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def probe(tree: Tree):
    """Where the tree's harmodt and harmodt_kernels import from (both must be inside it), and its methods."""
    proc = run_python(tree, ["-c", _PROBE], timeout=300)
    if proc.returncode != 0:
        raise SetupError(f"{tree.label} ({tree.root}) cannot import harmodt: {last_line(proc.stderr)}")
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    root = tree.root.resolve()
    for name in ("harmodt", "kernels"):
        if not Path(info[name]).is_relative_to(root):
            raise SetupError(f"{tree.label} imports {name} from {info[name]}, outside its tree {root}")
    tree.kernels, tree.methods = Path(info["kernels"]), info["methods"]


def native_sources(root: Path) -> str:
    """A digest of the tree's C++ sources (bytes) and CMakeLists.txt (without its comments and the
    line that sets where the library goes), by content: the same digest, the same library."""
    try:
        listed = git("ls-files", "--cached", "--others", "--exclude-standard", cwd=root).splitlines()
    except SetupError:  # not a git checkout: its files outside build/
        listed = [str(f.relative_to(root)) for f in root.rglob("*") if "build" not in f.relative_to(root).parts]
    digests = []
    for name in listed:
        path = root / name
        if path.name == "CMakeLists.txt" and path.is_file():
            lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
            text = "\n".join(line for line in lines if line and not line.startswith("set(HARMODT_OUTPUT_DIR"))
            digests.append(hashlib.sha256(text.encode()).hexdigest())
        elif name.endswith(NATIVE_SUFFIXES) and path.is_file():
            digests.append(hashlib.sha256(path.read_bytes()).hexdigest())
    return hashlib.sha256("\n".join(sorted(digests)).encode()).hexdigest()


def provide_native_lib(tree: Tree, donors: list[Tree], build: bool):
    """The tree's native library: already there, copied from a donor with the same C++ sources, or built."""
    if tree.lib.is_file():
        tree.native = "its own"
        return
    if not build:
        mine = native_sources(tree.root)
        for donor in donors:
            ready = donor is not tree and donor.kernels is not None and donor.lib.is_file()
            if ready and native_sources(donor.root) == mine:
                tree.lib.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(donor.lib, tree.lib)
                tree.native = f"copied from the {donor.label} (same native sources)"
                return
    print(f"building the native library of the {tree.label} (python setup.py build_ext --inplace) ...", file=sys.stderr)
    proc = run_python(tree, ["setup.py", "build_ext", "--inplace"], timeout=1800)
    if proc.returncode != 0 or not tree.lib.is_file():
        raise SetupError(f"building the {tree.label}'s native library failed: {last_line(proc.stderr or proc.stdout)}")
    tree.native = "built"


def write_data(trees: list[Tree], dest: Path) -> Path:
    """The synthetic data folder, written once by the first tree with tests/_data_folders.py."""
    for tree in trees:
        if (tree.root / "tests" / "_data_folders.py").is_file():
            proc = run_python(tree, ["-c", _WRITE_DATA, str(dest), ",".join(TASKS)], timeout=300)
            if proc.returncode != 0:
                raise SetupError(f"writing the data with the {tree.label}'s tests/_data_folders.py: "
                                 f"{last_line(proc.stderr)}")
            return dest
    raise SetupError("no tree has tests/_data_folders.py to write the synthetic data with")
