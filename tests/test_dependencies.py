"""pyproject.toml declares exactly what the five packages import, and the lock files follow pyproject.toml."""
from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
import tomllib

import pytest

from .helpers import REPO

PACKAGES = ("ssm_core", "kernels", "genomics", "audio", "timeseries")
# Declared but loaded by another package rather than imported by ours; each with where it is used.
USED_INDIRECTLY = {
    "tensorboard": "Lightning's TensorBoardLogger, made in ssm_core.training",
}


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(req: str) -> str:
    return _canonical(re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req).group(1))


def imported_modules() -> dict[str, set[str]]:
    """Top-level modules imported anywhere in the five packages (function bodies too), with the files."""
    found: dict[str, set[str]] = {}
    for pkg in PACKAGES:
        for path in (REPO / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in PACKAGES:
                        found.setdefault(top, set()).add(str(path.relative_to(REPO)))
    return found


def declared() -> tuple[set[str], set[str]]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    runtime = {_requirement_name(r) for r in project["dependencies"]}
    optional = {_requirement_name(r) for name, reqs in project.get("optional-dependencies", {}).items()
                if name != "dev" for r in reqs}
    return runtime, optional


def test_every_import_is_declared_and_every_dependency_imported():
    to_dist = md.packages_distributions()
    runtime, optional = declared()
    imported_dists = set()
    undeclared = []
    for module, files in sorted(imported_modules().items()):
        # An optional extra that is not installed here (sounddevice): its import name is its distribution's.
        dists = {_canonical(d) for d in to_dist.get(module, [])} or {_canonical(module)}
        imported_dists |= dists
        if not dists & (runtime | optional):
            undeclared.append(f"{module} from {sorted(dists)} ({sorted(files)[0]})")
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"
    unused = sorted(runtime - imported_dists - set(USED_INDIRECTLY))
    assert not unused, f"declared in pyproject.toml but imported nowhere in {PACKAGES}: {unused}"
    unused_optional = sorted(optional - imported_dists)
    assert not unused_optional, f"optional dependencies imported nowhere: {unused_optional}"


@pytest.mark.parametrize("lock", sorted((REPO / "requirements").glob("lock-*.txt")), ids=lambda p: p.name)
def test_lock_pins_every_declared_dependency(lock):
    """A dependency added to pyproject.toml without rerunning scripts/lock shows up here."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pinned = {_canonical(n) for n in re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==", lock.read_text(), re.M)}
    wanted = {_requirement_name(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]}
    assert wanted <= pinned, f"{lock.name} lacks {sorted(wanted - pinned)}: run scripts/lock"


def test_drift_check_names_missing_extra_and_changed_packages():
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import check_lock
    finally:
        sys.path.remove(str(REPO / "scripts"))
    problems = check_lock.drift({"torch": "2.11.0", "numpy": "2.3.5", "gone": "1.0"},
                                {"torch": "2.11.0", "numpy": "2.4.0", "rich": "14.0", "pip": "23.2"})
    assert problems == ["gone missing (lock: 1.0)", "numpy 2.4.0 (lock: 2.3.5)", "rich 14.0 extra (not in the lock)"]

