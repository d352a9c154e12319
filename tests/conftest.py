"""Shared test setup.

Without a GPU, Triton kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, set before anything
imports triton). Tests that use ../shared (the mamba_ssm oracle, real data) skip cleanly without it.
"""
import os
import sys
from pathlib import Path

import pytest
import torch

from .helpers import REPO

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip("../shared is absent (development data and the mamba_ssm oracle live there)")
    return SHARED


@pytest.fixture(scope="session")
def mamba_ssm_cpu(shared_dir):
    """mamba_ssm's own pure-PyTorch selective_scan_ref and Mamba block: an independent oracle."""
    bench = shared_dir / "bench"
    if not (bench / "mamba_reference.py").is_file():
        pytest.skip("../shared/bench/mamba_reference.py is absent")
    sys.path.insert(0, str(bench))
    try:
        import mamba_reference
        return mamba_reference.load_cpu()
    finally:
        sys.path.remove(str(bench))


@pytest.fixture(autouse=True)
def _restore_deterministic_algorithms():
    """A Lightning Trainer(deterministic=...) built in-process sets torch's global flag for good: put it back
    after each test so that it cannot change the code path of the tests after it."""
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])


@pytest.fixture
def deterministic_algorithms(monkeypatch):
    """torch.use_deterministic_algorithms(True) for one test (restored by the fixture above), with cuBLAS's
    reproducible workspace, without which torch refuses a CUDA matmul in this mode."""
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
