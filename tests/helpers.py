"""What several test files share that is not a fixture: the repository's root and a child process's environment."""
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def child_env(**extra: str) -> dict[str, str]:
    """os.environ for a child process that runs the suite's modules: the repository first on PYTHONPATH, ahead of
    (not instead of) the caller's entries, which may be where packages live (`pip install --target`, as on the
    device); SSM_DEBUG dropped, so the child's errors read as a user's would."""
    env = {**os.environ, **extra}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env.pop("SSM_DEBUG", None)
    return env
