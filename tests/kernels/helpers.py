"""Shared by the kernel tests: the device marker, tolerances and the relative error."""
import pytest
import torch

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device)")
TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all(), "non-finite values"
    if ref.norm() == 0:  # e.g. d(A) at L = 1 without h0: exactly zero, so compare absolutely
        return out.double().norm().item()
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-300)).item()
