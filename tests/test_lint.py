"""The code base stays lint-clean (ruff, configured in pyproject.toml)."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import REPO


def test_ruff_is_clean():
    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    if not Path(ruff).exists():
        pytest.fail("ruff is not installed: install the [dev] extra")
    r = subprocess.run([ruff, "check", "--no-cache", str(REPO)], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
