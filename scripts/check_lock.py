"""Fail with one line when the running environment differs from the lock file it was made from.

`.ci/run` calls this before the tests, so a cached virtualenv that drifted from requirements/ (a package
missing, extra, or at another version) cannot hide a broken fresh install.
  python scripts/check_lock.py requirements/lock-py311-linux-x86_64.txt
"""
from __future__ import annotations

import importlib.metadata as md
import re
import sys
from pathlib import Path

# Installed by `python -m venv` or by the editable install itself, not by the lock.
NOT_LOCKED = {"pip", "long-ssm"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def locked_versions(lock: Path) -> dict[str, str]:
    pins = re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", lock.read_text(), flags=re.M)
    return {canonical(name): version for name, version in pins}


def installed_versions() -> dict[str, str]:
    return {canonical(d.metadata["Name"]): d.version for d in md.distributions() if d.metadata["Name"]}


def drift(locked: dict[str, str], installed: dict[str, str]) -> list[str]:
    problems = [f"{n} missing (lock: {v})" for n, v in sorted(locked.items()) if n not in installed]
    problems += [f"{n} {installed[n]} (lock: {v})" for n, v in sorted(locked.items())
                 if n in installed and installed[n] != v]
    problems += [f"{n} {v} extra (not in the lock)" for n, v in sorted(installed.items())
                 if n not in locked and n not in NOT_LOCKED]
    return problems


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python scripts/check_lock.py LOCK_FILE", file=sys.stderr)
        return 2
    lock = Path(argv[0])
    problems = drift(locked_versions(lock), installed_versions())
    if problems:
        print(f"environment drifted from {lock}: {'; '.join(problems)} "
              f"(delete the virtualenv {sys.prefix} and rerun)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
