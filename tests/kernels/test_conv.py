"""kernels.causal_conv1d against the float64 reference: output, carried tail and every gradient.

On the CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py): tiny
shapes, every code path. Tests marked `cuda` are the device sweep (pytest tests/kernels -m cuda).
Tolerances (relative Frobenius error vs float64): fp32 1e-4, bf16/fp16 1e-2.
"""
from __future__ import annotations

import pytest
import torch

import kernels
from ssm_core.reference import causal_conv1d_ref

from .helpers import TOL, cuda, rel


@pytest.mark.parametrize("K,init,act,bias",
                         [(4, True, "silu", True), (4, False, None, False), (3, True, None, True)])
def test_causal_conv1d_matches_reference_cpu(K, init, act, bias, L=9):
    b, d = 2, 3
    g = torch.Generator().manual_seed(K)
    args = [torch.randn(b, d, L, generator=g), torch.randn(d, K, generator=g),
            torch.randn(d, generator=g) if bias else None,
            torch.randn(b, d, K - 1, generator=g) if init else None]
    a_k = [x.clone().requires_grad_() if x is not None else None for x in args]
    a_r = [x.double().requires_grad_() if x is not None else None for x in args]
    kw = dict(return_final_states=True, activation=act)
    out, tail = kernels.causal_conv1d(*a_k[:3], initial_states=a_k[3], **kw)
    out_r, tail_r = causal_conv1d_ref(*a_r[:3], initial_states=a_r[3], **kw)
    assert rel(out, out_r) < 1e-5 and torch.equal(tail.double(), tail_r)
    go, gt = torch.randn_like(out_r), torch.randn_like(tail_r)
    ((out.double() * go).sum() + (tail.double() * gt).sum()).backward()
    ((out_r * go).sum() + (tail_r * gt).sum()).backward()
    for x_k, x_r in zip(a_k, a_r):
        if x_k is not None:
            assert rel(x_k.grad, x_r.grad) < 1e-5


def test_causal_conv1d_spans_cpu(monkeypatch):
    # One 32-step tile per program: 75 steps are three programs along L (windows, the next steps' dpre and
    # the carried tail's gradient cross program boundaries), a partial last tile.
    monkeypatch.setattr(kernels.conv, "FWD_SPAN", 1)
    monkeypatch.setattr(kernels.conv, "BWD_SPAN", 1)
    test_causal_conv1d_matches_reference_cpu(4, True, "silu", True, L=75)


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_causal_conv1d_cuda(dtype):
    b, d, L, K = 2, 96, 1000, 4
    x = torch.randn(b, d, L, device="cuda", dtype=dtype)
    w, bias, init = torch.randn(d, K, device="cuda"), torch.randn(d, device="cuda"), torch.randn(b, d, K - 1,
                                                                                                  device="cuda")
    args = [x, w, bias, init.to(dtype)]
    a_k = [v.clone().requires_grad_() for v in args]
    a_r = [v.double().requires_grad_() for v in args]
    out = kernels.causal_conv1d(*a_k[:3], initial_states=a_k[3], activation="silu")
    out_r = causal_conv1d_ref(*a_r[:3], initial_states=a_r[3], activation="silu")
    assert rel(out, out_r) < TOL[dtype]
    go = torch.randn_like(out_r)
    (out.double() * go).sum().backward()
    (out_r * go).sum().backward()
    assert max(rel(p.grad, q.grad) for p, q in zip(a_k, a_r)) < TOL[dtype]
