"""The Mamba block's inner path as one autograd function: in_proj -> causal conv + silu -> x_proj / dt_proj
-> selective scan (softplus, D skip, silu(z) gate) -> out_proj, forward and backward.

Why one function. Composed from separate ops, the block moves its activations between the (batch, L,
channels) layout of the projections and the (batch, channels, L) layout the scan reads along time, and
those transposes (a dozen per training step, each a strided copy) cost more than the scan's backward.
Here every activation lives in one channel-major layout, a (channels, batch * L) matrix:

    xz     = W_in x^T                 (2 d_inner, bL)   u_pre and z are row blocks of it
    u      = silu(conv(u_pre))        (d_inner, bL)
    x_dbl  = W_x u                    (dt_rank + 2N, bL)  B and C are row blocks: (N, batch, L) views
    delta  = W_dt x_dbl[:dt_rank]     (d_inner, bL)
    y      = scan(u, delta, ..., z)   (d_inner, bL)
    out    = y^T W_out^T              (bL, d_model)

Each is a plain GEMM on a (possibly transposed) matrix, and each (batch, channels, L) view of these
matrices has unit stride along L, which the scan and conv kernels read in place. The backward mirrors it
(dz and the conv's input gradient are written straight into the rows of d xz) and, like mamba_ssm's
`mamba_inner_fn`, recomputes the conv output and delta instead of saving them.
"""
from __future__ import annotations

import torch
from torch.amp import custom_bwd, custom_fwd

from .conv import conv_bwd, conv_fwd
from .scan import _a2t, _scan_bwd, _scan_fwd, bc_lmajor, default_config


def _rows(m: torch.Tensor, b: int, L: int) -> torch.Tensor:
    """A (channels, b * L) matrix seen as (b, channels, L), unit stride along L."""
    return m.view(m.shape[0], b, L).transpose(0, 1)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else x.dtype


def _bc_rows(x_dbl: torch.Tensor, r: int, N: int, b: int, L: int):
    """B and C as (b, N, L) views of (L, N)-major copies of x_dbl's rows: the scan reads a step's states as
    one vector load."""
    return tuple(bc_lmajor(_rows(x_dbl[r + i * N:r + (i + 1) * N], b, L)) for i in range(2))


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)


class _MambaInnerFn(torch.autograd.Function):
    @staticmethod
    @custom_fwd(device_type="cuda")
    def forward(ctx, x, in_w, in_b, conv_w, conv_b, xp_w, dt_w, dt_b, A, D, out_w, out_b):
        b, L, dm = x.shape
        d_in, N, r = conv_w.shape[0], A.shape[1], dt_w.shape[1]
        cd = _compute_dtype(x)
        x2 = x.reshape(b * L, dm).to(cd)
        ctx.dtypes = [t.dtype if t is not None else None
                      for t in (x, in_w, in_b, conv_w, conv_b, xp_w, dt_w, dt_b, A, D, out_w, out_b)]
        in_w, in_b, xp_w, dt_w, out_w, out_b = (_cast(t, cd) for t in (in_w, in_b, xp_w, dt_w, out_w, out_b))
        xz = in_w @ x2.t()
        if in_b is not None:
            xz += in_b[:, None]
        u, x_dbl, delta = _conv_and_projections(xz, conv_w, conv_b, xp_w, dt_w, b, L)
        cfg = default_config(d_in, L, N, 1, batch=b)
        B, C = _bc_rows(x_dbl, r, N, b, L)
        A2t = _a2t(A)
        y = torch.empty(d_in, b * L, device=x.device, dtype=cd)
        z = _rows(xz[d_in:], b, L)
        _, _, ck, dts = _scan_fwd(_rows(u, b, L), _rows(delta, b, L), A2t, B, C, D, z, dt_b, True, None, None,
                                  cfg, y=_rows(y, b, L))
        out = y.t() @ out_w.t()
        if out_b is not None:
            out += out_b
        ctx.save_for_backward(x2, in_w, xz, conv_w, conv_b, x_dbl, xp_w, dt_w, A, D, dt_b, out_w, y, ck, dts)
        ctx.shape, ctx.cfg = (b, L, dm), cfg
        return out.view(b, L, dm)

    @staticmethod
    @custom_bwd(device_type="cuda")
    def backward(ctx, dout):
        x2, in_w, xz, conv_w, conv_b, x_dbl, xp_w, dt_w, A, D, dt_b, out_w, y, ck, dts = ctx.saved_tensors
        (b, L, dm), cfg = ctx.shape, ctx.cfg
        d_in, N, r = conv_w.shape[0], A.shape[1], dt_w.shape[1]
        cd = xz.dtype
        dout = dout.reshape(b * L, dm).to(cd)
        u, _, delta = _conv_and_projections(xz, conv_w, conv_b, xp_w, dt_w, b, L, x_dbl=x_dbl)
        dy = out_w.t() @ dout.t()                                       # (d_in, bL)
        d_out_w = dout.t() @ y.t()
        B, C = _bc_rows(x_dbl, r, N, b, L)
        dxz = torch.empty_like(xz)
        du = torch.empty_like(u)
        ddelta = torch.empty_like(delta)
        A2t = _a2t(A)
        _, _, dA, dB, dC, dD, _, dbias, _ = _scan_bwd(
            _rows(u, b, L), _rows(delta, b, L), A2t, B, C, D, _rows(xz[d_in:], b, L), dt_b, True, None, ck,
            dts, _rows(dy, b, L), None, cfg, du=_rows(du, b, L), ddelta=_rows(ddelta, b, L),
            dz=_rows(dxz[d_in:], b, L))
        dx_dbl = torch.empty_like(x_dbl)
        torch.mm(dt_w.t(), ddelta, out=dx_dbl[:r])
        d_dt_w = ddelta @ x_dbl[:r].t()
        for i, dX in enumerate((dB, dC)):
            _rows(dx_dbl[r + i * N:r + (i + 1) * N], b, L).copy_(dX)
        d_xp_w = dx_dbl @ u.t()
        du.addmm_(xp_w.t(), dx_dbl)                                    # x_proj's input gradient joins the scan's
        _, _, dconv_w, dconv_b = conv_bwd(_rows(xz[:d_in], b, L), conv_w, conv_b, None, True, _rows(du, b, L),
                                          dx=_rows(dxz[:d_in], b, L))
        n = ctx.needs_input_grad
        grads = (dxz.t() @ in_w if n[0] else None, dxz @ x2, dxz.sum(1) if n[2] else None, dconv_w, dconv_b,
                 d_xp_w, d_dt_w, dbias, dA, dD, d_out_w, dout.sum(0) if n[11] else None)
        grads = [g.to(dt) if need and g is not None else None for g, dt, need in zip(grads, ctx.dtypes, n)]
        if grads[0] is not None:
            grads[0] = grads[0].view(b, L, dm)
        return tuple(grads)


def mamba_inner(x, in_proj_weight, in_proj_bias, conv_weight, conv_bias, x_proj_weight, dt_proj_weight,
                dt_proj_bias, A, D, out_proj_weight, out_proj_bias=None):
    """The selective Mamba block from its parameters, fused; semantics of `ssm_core.reference.mamba_inner_ref`.

    x (batch, L, d_model) -> (batch, L, d_model). in_proj_weight (2 d_inner, d_model), conv_weight
    (d_inner, K), x_proj_weight (dt_rank + 2 N, d_inner), dt_proj_weight (d_inner, dt_rank), dt_proj_bias,
    D (d_inner,), A (d_inner, N) = -exp(A_log). Under CUDA autocast the activations and GEMMs run in the
    autocast dtype; the scan accumulates in float32."""
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[1] < 1:
        raise ValueError("x: expected a tensor of shape (batch, L >= 1, d_model)")
    d_in, N = A.shape
    r = dt_proj_weight.shape[1]
    if (tuple(in_proj_weight.shape) != (2 * d_in, x.shape[2]) or conv_weight.dim() != 2
            or conv_weight.shape[0] != d_in or tuple(x_proj_weight.shape) != (r + 2 * N, d_in)
            or tuple(out_proj_weight.shape) != (x.shape[2], d_in)):
        raise ValueError(f"mamba_inner: parameter shapes do not fit d_model={x.shape[2]}, d_inner={d_in}, "
                         f"d_state={N}, dt_rank={r}")
    return _MambaInnerFn.apply(x, in_proj_weight, in_proj_bias, conv_weight.contiguous(), conv_bias,
                               x_proj_weight, dt_proj_weight, dt_proj_bias.float(), A.float(), D.float(),
                               out_proj_weight, out_proj_bias)


def _conv_and_projections(xz, conv_w, conv_b, xp_w, dt_w, b, L, x_dbl=None):
    """u = silu(conv(u_pre)), x_dbl = W_x u (unless given: the backward reuses the saved one) and
    delta = W_dt x_dbl[:dt_rank], all (channels, b * L)."""
    d_in, r = conv_w.shape[0], dt_w.shape[1]
    u = torch.empty(d_in, b * L, device=xz.device, dtype=xz.dtype)
    conv_fwd(_rows(xz[:d_in], b, L), conv_w, conv_b, None, True, out=_rows(u, b, L))
    if x_dbl is None:
        x_dbl = xp_w @ u
    return u, x_dbl, dt_w @ x_dbl[:r]
