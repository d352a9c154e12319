"""kernels.selective_state_update (one decoding step, state updated in place) against the float64
reference.

On the CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py): tiny
shapes, every code path. Tests marked `cuda` are the device sweep (pytest tests/kernels -m cuda).
Tolerances (relative Frobenius error vs float64): fp32 1e-4, bf16/fp16 1e-2.
"""
from __future__ import annotations

import pytest
import torch

import kernels
from ssm_core.reference import selective_state_update_ref

from .helpers import TOL, cuda, rel


@pytest.mark.parametrize("groups", [None, 2])
def test_selective_state_update_matches_reference_cpu(groups):
    b, d, n = 3, 6, 5
    g = torch.Generator().manual_seed(7)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    bc = (b, n) if groups is None else (b, groups, n)
    state, x, dt, A = r(b, d, n), r(b, d), r(b, d), -torch.rand(d, n, generator=g)
    B, C, D, z, bias = r(*bc), r(*bc), r(d), r(b, d), r(d)
    s_k, s_r = state.clone(), state.double()
    y = kernels.selective_state_update(s_k, x, dt, A, B, C, D=D, z=z, dt_bias=bias, dt_softplus=True)
    y_r = selective_state_update_ref(s_r, *(v.double() for v in (x, dt, A, B, C)), D=D.double(), z=z.double(),
                                     dt_bias=bias.double(), dt_softplus=True)
    assert rel(y, y_r) < 1e-5 and rel(s_k, s_r) < 1e-5  # state updated in place


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_selective_state_update_cuda(dtype):
    b, d, n = 2, 96, 16
    D, bias = torch.randn(d, device="cuda"), torch.randn(d, device="cuda")
    state = torch.randn(b, d, n, device="cuda")
    xs, dt, z = (torch.randn(b, d, device="cuda", dtype=dtype) for _ in range(3))
    A, B, C = -torch.rand(d, n, device="cuda"), torch.randn(b, n, device="cuda", dtype=dtype), torch.randn(
        b, n, device="cuda", dtype=dtype)
    s_k, s_r = state.clone(), state.double()
    y = kernels.selective_state_update(s_k, xs, dt, A, B, C, D=D, z=z, dt_bias=bias, dt_softplus=True)
    y_r = selective_state_update_ref(s_r, *(v.double() for v in (xs, dt, A, B, C)), D=D.double(),
                                     z=z.double(), dt_bias=bias.double(), dt_softplus=True)
    assert rel(y, y_r) < TOL[dtype] and rel(s_k, s_r) < 1e-4
