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

Given the pre-norm RMSNorm's weight, the function is the whole residual block, x + inner(rms_norm(x)): it
then saves the residual stream x (which the backbone keeps anyway) and recomputes its normalised copy in
the backward instead of saving both, a (batch * L, d_model) tensor less per layer (mamba_ssm saves both:
its fused add-norm keeps the stream, in_proj its input). The residual add rides in out_proj's GEMM (with
float32 output for an fp32 stream) and the residual's gradient in the norm's backward kernel.
"""
from __future__ import annotations

import torch
from torch.amp import custom_bwd, custom_fwd

from .conv import conv_bwd, conv_fwd
from .norm import rms_norm_bwd, rms_norm_fwd
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


def _out_proj(y, out_w, out_b, residual):
    """y^T W_out^T (+ bias) (bL, d_model), plus `residual` (bL, d_model) when given, in the promoted dtype
    of the two (the residual add of a pre-norm block: inside the GEMM, with float32 accumulation kept for
    an fp32 stream)."""
    if residual is None:
        out = y.t() @ out_w.t()
    elif residual.dtype == y.dtype:
        out = torch.addmm(residual, y.t(), out_w.t())
    elif residual.is_cuda and residual.dtype == torch.float32:
        out = torch.addmm(residual, y.t(), out_w.t(), out_dtype=torch.float32)
    else:
        out = residual + y.t() @ out_w.t()
    if out_b is not None:
        out += out_b
    return out


class _MambaInnerFn(torch.autograd.Function):
    @staticmethod
    @custom_fwd(device_type="cuda")
    def forward(ctx, x, in_w, in_b, conv_w, conv_b, xp_w, dt_w, dt_b, A, D, out_w, out_b, norm_w, norm_eps):
        b, L, dm = x.shape
        d_in, N, r = conv_w.shape[0], A.shape[1], dt_w.shape[1]
        # The compute dtype: autocast's, else the activations' (with a norm: the parameters', since x is
        # then the residual stream, float32 under residual_in_fp32).
        cd = _compute_dtype(x if norm_w is None else norm_w)
        ctx.dtypes = [t.dtype if t is not None else None
                      for t in (x, in_w, in_b, conv_w, conv_b, xp_w, dt_w, dt_b, A, D, out_w, out_b, norm_w)]
        in_w, in_b, xp_w, dt_w, out_w, out_b = (_cast(t, cd) for t in (in_w, in_b, xp_w, dt_w, out_w, out_b))
        if norm_w is None:
            res, rstd, x2 = None, None, x.reshape(b * L, dm).to(cd)
        else:
            res = x.reshape(b * L, dm).contiguous()
            x2, rstd = rms_norm_fwd(res, norm_w, norm_eps, cd)
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
        del u, delta, B, C
        out = _out_proj(y, out_w, out_b, res)
        ctx.save_for_backward(x2 if norm_w is None else res, in_w, xz, conv_w, conv_b, x_dbl, xp_w, dt_w, A, D,
                              dt_b, out_w, y, ck, dts, norm_w, rstd)
        ctx.shape, ctx.cfg, ctx.norm_eps = (b, L, dm), cfg, norm_eps
        return out.view(b, L, dm)

    @staticmethod
    @custom_bwd(device_type="cuda")
    def backward(ctx, dout):
        x2, in_w, xz, conv_w, conv_b, x_dbl, xp_w, dt_w, A, D, dt_b, out_w, y, ck, dts, norm_w, rstd = \
            ctx.saved_tensors
        (b, L, dm), cfg = ctx.shape, ctx.cfg
        d_in, N, r = conv_w.shape[0], A.shape[1], dt_w.shape[1]
        cd = xz.dtype
        res = None
        if norm_w is not None:   # x2 is the residual stream: its normalised copy is recomputed, not saved
            res, x2 = x2, rms_norm_fwd(x2, norm_w, ctx.norm_eps, cd)[0]
        dres = dout.reshape(b * L, dm)
        dout = dres.to(cd)
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
        del delta, dy, B, C   # dropped as soon as they are used: the backward's peak sets training's
        dx_dbl = torch.empty_like(x_dbl)
        torch.mm(dt_w.t(), ddelta, out=dx_dbl[:r])
        d_dt_w = ddelta @ x_dbl[:r].t()
        del ddelta
        for i, dX in enumerate((dB, dC)):
            _rows(dx_dbl[r + i * N:r + (i + 1) * N], b, L).copy_(dX)
        d_xp_w = dx_dbl @ u.t()
        del u
        du.addmm_(xp_w.t(), dx_dbl)                                    # x_proj's input gradient joins the scan's
        del dx_dbl
        _, _, dconv_w, dconv_b = conv_bwd(_rows(xz[:d_in], b, L), conv_w, conv_b, None, True, _rows(du, b, L),
                                          dx=_rows(dxz[:d_in], b, L))
        del du
        n = ctx.needs_input_grad
        d_in_w = dxz @ x2
        del x2
        dx, d_norm_w = (dxz.t() @ in_w if n[0] or norm_w is not None else None), None
        if norm_w is not None:   # through the norm, plus the residual path's gradient
            dx, d_norm_w = rms_norm_bwd(res, norm_w, rstd, dx, dres=dres)
        grads = (dx, d_in_w, dxz.sum(1) if n[2] else None, dconv_w, dconv_b, d_xp_w, d_dt_w, dbias, dA, dD,
                 d_out_w, dout.sum(0) if n[11] else None, d_norm_w)
        grads = [g.to(dt) if need and g is not None else None for g, dt, need in zip(grads, ctx.dtypes, n)]
        if grads[0] is not None:
            grads[0] = grads[0].view(b, L, dm)
        return (*grads, None)


def mamba_inner(x, in_proj_weight, in_proj_bias, conv_weight, conv_bias, x_proj_weight, dt_proj_weight,
                dt_proj_bias, A, D, out_proj_weight, out_proj_bias=None, norm_weight=None, norm_eps=1e-5):
    """The selective Mamba block from its parameters, fused; semantics of `ssm_core.reference.mamba_inner_ref`.
    With `norm_weight` (d_model,), x is a residual stream (any float dtype) and the result is the pre-norm
    residual block x + inner(rms_norm(x)), in the promoted dtype of x and the compute dtype.

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
            or tuple(out_proj_weight.shape) != (x.shape[2], d_in)
            or (norm_weight is not None and tuple(norm_weight.shape) != (x.shape[2],))):
        raise ValueError(f"mamba_inner: parameter shapes do not fit d_model={x.shape[2]}, d_inner={d_in}, "
                         f"d_state={N}, dt_rank={r}")
    return _MambaInnerFn.apply(x, in_proj_weight, in_proj_bias, conv_weight.contiguous(), conv_bias,
                               x_proj_weight, dt_proj_weight, dt_proj_bias.float(), A.float(), D.float(),
                               out_proj_weight, out_proj_bias, norm_weight, float(norm_eps))


def _conv_and_projections(xz, conv_w, conv_b, xp_w, dt_w, b, L, x_dbl=None):
    """u = silu(conv(u_pre)), x_dbl = W_x u (unless given: the backward reuses the saved one) and
    delta = W_dt x_dbl[:dt_rank], all (channels, b * L)."""
    d_in, r = conv_w.shape[0], dt_w.shape[1]
    u = torch.empty(d_in, b * L, device=xz.device, dtype=xz.dtype)
    conv_fwd(_rows(xz[:d_in], b, L), conv_w, conv_b, None, True, out=_rows(u, b, L))
    if x_dbl is None:
        x_dbl = xp_w @ u
    return u, x_dbl, dt_w @ x_dbl[:r]
