"""kernels.rms_norm against the float64 reference: any input and output dtype, gradients included.

On the CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py): tiny
shapes, every code path. Tests marked `cuda` are the device sweep (pytest tests/kernels -m cuda).
Tolerances (relative Frobenius error vs float64): fp32 1e-4, bf16/fp16 1e-2.
"""
from __future__ import annotations

import pytest
import torch

import kernels
from ssm_core.reference import rms_norm_ref

from .helpers import cuda, rel


def check_rms_norm(shape, in_dtype, out_dtype, device, tol):
    g = torch.Generator(device=device).manual_seed(0)
    x = (torch.randn(*shape, generator=g, device=device) * 3).to(in_dtype)
    w = torch.randn(shape[-1], generator=g, device=device)
    x_k, w_k = x.clone().requires_grad_(), w.clone().requires_grad_()
    x_r, w_r = x.double().requires_grad_(), w.double().requires_grad_()
    y = kernels.rms_norm(x_k, w_k, 1e-5, out_dtype=out_dtype)
    y_r = rms_norm_ref(x_r, w_r, 1e-5)
    assert y.dtype == out_dtype and rel(y, y_r) < tol
    gy = torch.randn(y_r.shape, generator=g, device=device, dtype=torch.float64)
    (y.double() * gy).sum().backward()
    (y_r * gy).sum().backward()
    assert x_k.grad.dtype == in_dtype and rel(x_k.grad, x_r.grad) < tol and rel(w_k.grad, w_r.grad) < tol


@pytest.mark.parametrize("shape,in_dtype,out_dtype", [((3, 5, 24), torch.float32, torch.float32),
                                                      ((37, 6), torch.float32, torch.bfloat16)])
def test_rms_norm_matches_reference_cpu(shape, in_dtype, out_dtype):
    """Rows padded to a power of two and several programs; a float32 residual normalised into bf16."""
    check_rms_norm(shape, in_dtype, out_dtype, "cpu", 1e-5 if out_dtype == torch.float32 else 1e-2)


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("shape,in_dtype,out_dtype", [((4, 1000, 256), torch.float32, torch.bfloat16),
                                                      ((3, 77, 1536), torch.bfloat16, torch.bfloat16),
                                                      ((5, 40), torch.float32, torch.float32)])
def test_rms_norm_cuda(shape, in_dtype, out_dtype):
    check_rms_norm(shape, in_dtype, out_dtype, "cuda", 1e-5 if out_dtype == torch.float32 else 1e-2)
