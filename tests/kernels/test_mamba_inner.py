"""kernels.mamba_inner (the fused selective Mamba block, with or without its pre-norm) against the
float64 composition of reference ops: the output and the gradient of the input and of every parameter.

On the CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py): tiny
shapes, every code path. Tests marked `cuda` are the device sweep (pytest tests/kernels -m cuda).
Tolerances (relative Frobenius error vs float64): fp32 1e-4, bf16/fp16 1e-2.
"""
from __future__ import annotations

import pytest
import torch

import kernels
from ssm_core.reference import mamba_inner_ref

from .helpers import TOL, cuda, rel


def mamba_inner_params(d_model, d_inner, n, r, K=4, biases=False, device="cpu", seed=0, norm=False):
    g = torch.Generator(device=device).manual_seed(seed)
    r_ = lambda *s: torch.randn(*s, generator=g, device=device)  # noqa: E731
    return dict(in_proj_weight=r_(2 * d_inner, d_model) / d_model ** 0.5,
                in_proj_bias=r_(2 * d_inner) * 0.1 if biases else None,
                conv_weight=r_(d_inner, K) * 0.5, conv_bias=r_(d_inner) * 0.1,
                x_proj_weight=r_(r + 2 * n, d_inner) / d_inner ** 0.5, dt_proj_weight=r_(d_inner, r) / r ** 0.5,
                dt_proj_bias=r_(d_inner) * 0.3 - 2, A=-torch.rand(d_inner, n, generator=g, device=device) * 2 - 0.1,
                D=r_(d_inner), out_proj_weight=r_(d_model, d_inner) / d_inner ** 0.5,
                out_proj_bias=r_(d_model) * 0.1 if biases else None,
                norm_weight=1 + 0.2 * r_(d_model) if norm else None)


def check_mamba_inner(b, L, d_model, d_inner, n, r, biases, device, dtype, tol, seed=0, norm=False):
    """kernels.mamba_inner (fp32 parameters, `dtype` autocast on CUDA) vs mamba_inner_ref in float64: the
    output and the gradient of the input and of every parameter. With `norm`, the pre-norm residual block
    (x an fp32 residual stream, RMSNorm weight among the parameters)."""
    p = mamba_inner_params(d_model, d_inner, n, r, biases=biases, device=device, seed=seed, norm=norm)
    x = torch.randn(b, L, d_model, device=device, generator=torch.Generator(device=device).manual_seed(seed + 1))
    p_k = {k: v.clone().requires_grad_() for k, v in p.items() if v is not None}
    p_r = {k: v.double().requires_grad_() for k, v in p.items() if v is not None}
    x_k, x_r = x.clone().requires_grad_(), x.double().requires_grad_()
    with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        y = kernels.mamba_inner(x_k, **{k: p_k.get(k) for k in p})
    y_r = mamba_inner_ref(x_r, **{k: p_r.get(k) for k in p})
    assert y.shape == y_r.shape and rel(y, y_r) < tol
    gy = torch.randn(y_r.shape, device=device, dtype=torch.float64,
                     generator=torch.Generator(device=device).manual_seed(seed + 2))
    (y.double() * gy).sum().backward()
    (y_r * gy).sum().backward()
    errs = {k: rel(p_k[k].grad, p_r[k].grad) for k in p_k} | {"x": rel(x_k.grad, x_r.grad)}
    assert all(p_k[k].grad.dtype == torch.float32 for k in p_k)
    limit = dict.fromkeys(errs, tol)
    if dtype != torch.float32:
        # Half-precision GEMMs over the whole block round more than one kernel does: the bound is then the
        # error of the same block composed from the separately tested ops under the same autocast.
        p_c = {k: v.clone().requires_grad_() for k, v in p.items() if v is not None}
        x_c = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=dtype):
            y_c = mamba_inner_ref(x_c, **{k: p_c.get(k) for k in p}, scan=kernels.selective_scan,
                                  conv=kernels.causal_conv1d, norm=kernels.rms_norm)
        (y_c.double() * gy).sum().backward()
        comp = {k: rel(p_c[k].grad, p_r[k].grad) for k in p_c} | {"x": rel(x_c.grad, x_r.grad)}
        limit = {k: max(tol, 1.5 * comp[k]) for k in errs}
    assert all(errs[k] < limit[k] for k in errs), (errs, limit)


@pytest.mark.parametrize("biases,norm", [(False, False), (True, False), (True, True)])
def test_mamba_inner_matches_reference_cpu(biases, norm):
    """The fused block (one layout, no copies, conv and delta recomputed in the backward; with `norm` the
    pre-norm residual block, its normalised input recomputed too) equals the composition of reference ops,
    output and every gradient (interpreter, tiny shapes, 2 chunks + tail)."""
    check_mamba_inner(b=2, L=19, d_model=6, d_inner=8, n=4, r=3, biases=biases, device="cpu",
                      dtype=torch.float32, tol=1e-4, norm=norm)


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype,L,norm", [(torch.float32, 2048, False), (torch.bfloat16, 4096, False),
                                          (torch.bfloat16, 65536, False), (torch.float32, 2048, True),
                                          (torch.bfloat16, 4096, True)])
def test_mamba_inner_cuda(dtype, L, norm):
    check_mamba_inner(b=2 if L < 65536 else 1, L=L, d_model=64, d_inner=128, n=16, r=4, biases=True,
                      device="cuda", dtype=dtype, tol=TOL[dtype], norm=norm)
