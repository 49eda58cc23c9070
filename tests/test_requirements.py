"""setup.py declares every third-party package harmodt and kernels import: the plain ones in
install_requires, the optional ones (imported where a feature needs them) in an extra."""

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def setup_requirements() -> tuple[set[str], set[str]]:
    """The distribution names of setup.py's install_requires and of all its extras."""
    call = next(n for n in ast.walk(ast.parse((ROOT / "setup.py").read_text())) if isinstance(n, ast.Call)
                and getattr(n.func, "id", None) == "setup")
    kw = {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg in ("install_requires", "extras_require")}
    name = lambda spec: re.match(r"[A-Za-z0-9_.-]+", spec).group(0).lower()  # noqa: E731
    return {name(s) for s in kw["install_requires"]}, {name(s) for specs in kw["extras_require"].values() for s in specs}


def imported_packages() -> set[str]:
    """The top-level names every module of harmodt/ and kernels/ imports, outside the standard library and themselves."""
    names = set()
    for path in [*(ROOT / "harmodt").rglob("*.py"), *(ROOT / "kernels").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n not in ("harmodt", "harmodt_kernels", "kernels", "__future__")}


def test_every_imported_package_is_declared():
    required, extras = setup_requirements()
    imported = {n.lower() for n in imported_packages()}  # (each import name is its distribution's name)
    assert {"scipy", "numpy", "torch", "metaworld", "gymnasium", "matplotlib", "tqdm"} <= imported  # what the scan must find
    assert imported - required - extras == set()
