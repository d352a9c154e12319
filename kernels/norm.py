"""RMSNorm in Triton, forward and backward: y = x / sqrt(mean(x^2) + eps) * weight, rows of width d.

One program normalises ROWS rows held whole in registers (d up to a few thousand), computing in fp32 from
any input dtype and writing any output dtype, so the backbone's fp32 residual stream is normalised
straight into the mixers' bf16 input without a separate cast. The backward recomputes x_hat from x and
the saved 1/rms, optionally adds the gradient that reaches x around the norm (a pre-norm block's residual
path), and writes per-program partial sums of d(weight) that the host adds up. `rms_norm_fwd` /
`rms_norm_bwd` are the launches, shared with the fused Mamba block (kernels.mamba_inner).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rows(x_ptr, M, D, s_x, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    m = (rows < M)[:, None] & (cols < D)[None, :]
    x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * s_x + cols[None, :], mask=m, other=0.).to(tl.float32)
    return rows, cols, m, x


@triton.jit
def _rms_norm_fwd_kernel(x_ptr, w_ptr, out_ptr, rstd_ptr, M, D, eps, s_x,
                         ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows, cols, m, x = _rows(x_ptr, M, D, s_x, ROWS, BLOCK)
    rstd = 1. / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)
    w = tl.load(w_ptr + cols, mask=cols < D, other=0.).to(tl.float32)
    y = x * rstd[:, None] * w[None, :]
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=m)
    tl.store(rstd_ptr + rows, rstd, mask=rows < M)


@triton.jit
def _rms_norm_bwd_kernel(x_ptr, w_ptr, rstd_ptr, dy_ptr, dres_ptr, dx_ptr, dw_ptr, M, D, s_x,
                         HAS_DRES: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows, cols, m, x = _rows(x_ptr, M, D, s_x, ROWS, BLOCK)
    dy = tl.load(dy_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :], mask=m, other=0.).to(tl.float32)
    rstd = tl.load(rstd_ptr + rows, mask=rows < M, other=0.)
    w = tl.load(w_ptr + cols, mask=cols < D, other=0.).to(tl.float32)
    xhat = x * rstd[:, None]
    g = dy * w[None, :]
    dx = rstd[:, None] * (g - xhat * (tl.sum(g * xhat, axis=1) / D)[:, None])
    if HAS_DRES:
        dx += tl.load(dres_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :], mask=m, other=0.).to(tl.float32)
    tl.store(dx_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=m)
    tl.store(dw_ptr + tl.program_id(0) * D + cols, tl.sum(dy * xhat, axis=0), mask=cols < D)


def _meta(D: int) -> tuple[int, int, int]:
    block = triton.next_power_of_2(D)
    rows = max(1, min(16, 4096 // block))     # about 4k elements a program
    return block, rows, max(2, min(16, block * rows // 1024))   # ~256 elements a thread at most


def _rows2d(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def rms_norm_fwd(x2: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype):
    """x2 (M, D) with unit column stride -> (y (M, D) contiguous in out_dtype, 1/rms (M,) float32)."""
    M, D = x2.shape
    out = torch.empty(M, D, device=x2.device, dtype=out_dtype)
    rstd = torch.empty(M, device=x2.device, dtype=torch.float32)
    block, rows, warps = _meta(D)
    _rms_norm_fwd_kernel[(triton.cdiv(M, rows),)](x2, weight, out, rstd, M, D, eps, x2.stride(0),
                                                   ROWS=rows, BLOCK=block, num_warps=warps)
    return out, rstd


def rms_norm_bwd(x2: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, dy: torch.Tensor,
                 dres: torch.Tensor | None = None):
    """Gradients (dx in x2's dtype, dweight in weight's dtype) of y = rms_norm(x2) given dy (M, D); with
    `dres` (M, D) the gradient reaching x2 by another path (a residual add) is added into dx."""
    M, D = x2.shape
    block, rows, warps = _meta(D)
    grid = triton.cdiv(M, rows)
    dx = torch.empty(M, D, device=x2.device, dtype=x2.dtype)
    dw = torch.empty(grid, D, device=x2.device, dtype=torch.float32)
    dy = dy.reshape(M, D).contiguous()
    dres = None if dres is None else dres.reshape(M, D).contiguous()
    _rms_norm_bwd_kernel[(grid,)](x2, weight, rstd, dy, dy if dres is None else dres, dx, dw, M, D, x2.stride(0),
                                  HAS_DRES=dres is not None, ROWS=rows, BLOCK=block, num_warps=warps)
    return dx, dw.sum(0).to(weight.dtype)


class _RMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, out_dtype):
        x2 = _rows2d(x)
        out, rstd = rms_norm_fwd(x2, weight, eps, out_dtype)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.shape = x.shape
        return out.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        dx, dw = rms_norm_bwd(x2, weight, rstd, dy)
        return dx.view(ctx.shape), dw, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5, out_dtype: torch.dtype | None = None):
    """Semantics of `ssm_core.reference.rms_norm_ref`: x (..., d) of any float dtype, weight (d,);
    computed in float32, returned in out_dtype (default x's dtype)."""
    if x.shape[-1] != weight.shape[0] or weight.dim() != 1:
        raise ValueError(f"rms_norm: weight of shape ({x.shape[-1]},) expected, got {tuple(weight.shape)}")
    return _RMSNormFn.apply(x, weight, float(eps), out_dtype or x.dtype)
