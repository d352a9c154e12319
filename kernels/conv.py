"""Depthwise causal conv1d (Mamba's short conv) in Triton, forward and backward, with a carried tail.

Index the padded input xx = concat(initial_states, x) (length L + K - 1): out_i = bias + sum_k w_k xx_{i+k}.
Each program handles (batch, BLOCK_D channels, BLOCK_L positions) and reads its K - 1 halo from the
cache. The backward produces d(xx) in one pass (d initial_states is its first K - 1 columns) and adds
per-program partials of dw and dbias with atomics. K is small (4 in Mamba): loops over K are unrolled.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _load_xx(x_ptr, init_ptr, q, m2, offs_d, s_xd, s_xl, s_id, s_il, K: tl.constexpr, HAS_INIT: tl.constexpr):
    """xx_q for q in [0, L + K - 1): the carried tail for q < K - 1, else x_{q - K + 1}."""
    d64 = offs_d.to(tl.int64)[:, None]
    in_x = q >= K - 1
    v = tl.load(x_ptr + d64 * s_xd + (q - (K - 1))[None, :] * s_xl, mask=m2 & in_x[None, :], other=0.)
    if HAS_INIT:
        vi = tl.load(init_ptr + d64 * s_id + q[None, :] * s_il, mask=m2 & (q < K - 1)[None, :], other=0.)
        v = tl.where(in_x[None, :], v, vi)
    return v.to(tl.float32)


@triton.jit
def _conv_pre(x_ptr, init_ptr, w, bias, i, m2, offs_d, offs_k, s_xd, s_xl, s_id, s_il,
              K: tl.constexpr, HAS_INIT: tl.constexpr):
    acc = tl.where(m2, 0., 0.) + bias[:, None]
    for k in tl.static_range(K):
        xk = _load_xx(x_ptr, init_ptr, i + k, m2, offs_d, s_xd, s_xl, s_id, s_il, K, HAS_INIT)
        wk = tl.sum(tl.where(offs_k[None, :] == k, w, 0.), axis=1)
        acc += wk[:, None] * xk
    return acc


@triton.jit
def _conv_params(w_ptr, b_ptr, offs_d, mask_d, offs_k, K: tl.constexpr, BLOCK_D: tl.constexpr,
                 HAS_BIAS: tl.constexpr):
    """weight (BLOCK_D, BLOCK_K) and bias (BLOCK_D,) in fp32, zero-padded."""
    w = tl.load(w_ptr + offs_d[:, None] * K + offs_k[None, :], mask=mask_d[:, None] & (offs_k < K)[None, :],
                other=0.).to(tl.float32)
    bias = tl.zeros([BLOCK_D], tl.float32)
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_d, mask=mask_d, other=0.).to(tl.float32)
    return w, bias


@triton.jit
def _conv_fwd_kernel(x_ptr, init_ptr, w_ptr, b_ptr, out_ptr, L, DIM,
                     s_xb, s_xd, s_xl, s_ib, s_id, s_il,
                     K: tl.constexpr, BLOCK_K: tl.constexpr, HAS_INIT: tl.constexpr, HAS_BIAS: tl.constexpr,
                     SILU: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr):
    pid_b = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    i = tl.program_id(2) * BLOCK_L + tl.arange(0, BLOCK_L)
    mask_d = offs_d < DIM
    m2 = mask_d[:, None] & (i < L)[None, :]
    offs_k = tl.arange(0, BLOCK_K)
    w, bias = _conv_params(w_ptr, b_ptr, offs_d, mask_d, offs_k, K, BLOCK_D, HAS_BIAS)
    pre = _conv_pre(x_ptr + pid_b * s_xb, init_ptr + pid_b * s_ib, w, bias, i, m2, offs_d, offs_k,
                    s_xd, s_xl, s_id, s_il, K, HAS_INIT)
    if SILU:
        pre = pre * tl.sigmoid(pre)
    tl.store(out_ptr + pid_b * DIM * L + offs_d.to(tl.int64)[:, None] * L + i[None, :],
             pre.to(out_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _conv_bwd_kernel(x_ptr, init_ptr, w_ptr, b_ptr, dout_ptr, dx_ptr, dinit_ptr, dw_ptr, dbias_ptr, L, DIM,
                     s_xb, s_xd, s_xl, s_ib, s_id, s_il,
                     K: tl.constexpr, BLOCK_K: tl.constexpr, HAS_INIT: tl.constexpr, HAS_BIAS: tl.constexpr,
                     SILU: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr):
    pid_b = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    q = tl.program_id(2) * BLOCK_L + tl.arange(0, BLOCK_L)     # positions in xx
    mask_d = offs_d < DIM
    d64 = offs_d.to(tl.int64)[:, None]
    offs_k = tl.arange(0, BLOCK_K)
    w, bias = _conv_params(w_ptr, b_ptr, offs_d, mask_d, offs_k, K, BLOCK_D, HAS_BIAS)
    x_ptr += pid_b * s_xb
    init_ptr += pid_b * s_ib
    dout_ptr += pid_b * DIM * L
    dxx = tl.zeros([BLOCK_D, BLOCK_L], tl.float32)
    # d xx_q = sum_k w_k dpre_{q-k}; dpre is recomputed at each shift (K^2 cached loads, no extra pass).
    for k in tl.static_range(K):
        i = q - k
        mi = mask_d[:, None] & ((i >= 0) & (i < L))[None, :]
        dpre = tl.load(dout_ptr + d64 * L + i[None, :], mask=mi, other=0.).to(tl.float32)
        if SILU:
            pre = _conv_pre(x_ptr, init_ptr, w, bias, i, mi, offs_d, offs_k, s_xd, s_xl, s_id, s_il, K,
                            HAS_INIT)
            sig = tl.sigmoid(pre)
            dpre = dpre * sig * (1. + pre * (1. - sig))
        wk = tl.sum(tl.where(offs_k[None, :] == k, w, 0.), axis=1)
        dxx += wk[:, None] * dpre
        if k == 0:
            # dw_j = sum_i dpre_i xx_{i+j}, dbias = sum_i dpre_i over this program's i = q.
            dw = tl.zeros([BLOCK_D, BLOCK_K], tl.float32)
            for j in tl.static_range(K):
                xj = _load_xx(x_ptr, init_ptr, i + j, mi, offs_d, s_xd, s_xl, s_id, s_il, K, HAS_INIT)
                dw += tl.where(offs_k[None, :] == j, tl.sum(dpre * xj, axis=1)[:, None], 0.)
            tl.atomic_add(dw_ptr + offs_d[:, None] * K + offs_k[None, :], dw,
                          mask=mask_d[:, None] & (offs_k < K)[None, :], sem="relaxed")
            if HAS_BIAS:
                tl.atomic_add(dbias_ptr + offs_d, tl.sum(dpre, axis=1), mask=mask_d, sem="relaxed")
    in_x = (q >= K - 1) & (q < L + K - 1)
    tl.store(dx_ptr + pid_b * DIM * L + d64 * L + (q - (K - 1))[None, :], dxx.to(dx_ptr.dtype.element_ty),
             mask=mask_d[:, None] & in_x[None, :])
    if HAS_INIT:
        tl.store(dinit_ptr + pid_b * DIM * (K - 1) + d64 * (K - 1) + q[None, :],
                 dxx.to(dinit_ptr.dtype.element_ty), mask=mask_d[:, None] & (q < K - 1)[None, :])


def _launch_args(x, init, K, silu, bias):
    ii = init if init is not None else x
    meta = dict(K=K, BLOCK_K=triton.next_power_of_2(K), HAS_INIT=init is not None, HAS_BIAS=bias is not None,
                SILU=silu, BLOCK_D=16, BLOCK_L=128)
    return (*x.stride(), *ii.stride()), meta


class _CausalConv1dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, init, silu):
        b, dim, L = x.shape
        K = weight.shape[1]
        out = torch.empty(b, dim, L, device=x.device, dtype=x.dtype)
        strides, meta = _launch_args(x, init, K, silu, bias)
        grid = (b, triton.cdiv(dim, meta["BLOCK_D"]), triton.cdiv(L, meta["BLOCK_L"]))
        _conv_fwd_kernel[grid](x, init if init is not None else x, weight, bias, out, L, dim, *strides,
                               **meta)
        ctx.save_for_backward(x, weight, bias, init)
        ctx.silu = silu
        return out

    @staticmethod
    def backward(ctx, dout):
        x, weight, bias, init = ctx.saved_tensors
        b, dim, L = x.shape
        K = weight.shape[1]
        dout = dout.contiguous()
        dx = torch.empty(b, dim, L, device=x.device, dtype=x.dtype)
        dinit = torch.empty(b, dim, K - 1, device=x.device, dtype=init.dtype) if init is not None else None
        dw = torch.zeros(dim, K, device=x.device, dtype=torch.float32)
        dbias = torch.zeros(dim, device=x.device, dtype=torch.float32) if bias is not None else None
        strides, meta = _launch_args(x, init, K, ctx.silu, bias)
        grid = (b, triton.cdiv(dim, meta["BLOCK_D"]), triton.cdiv(L + K - 1, meta["BLOCK_L"]))
        _conv_bwd_kernel[grid](x, init if init is not None else x, weight, bias, dout, dx,
                               dinit if dinit is not None else dx, dw, dbias, L, dim, *strides, **meta)
        return (dx, dw.to(weight.dtype), dbias.to(bias.dtype) if bias is not None else None,
                dinit, None)


def causal_conv1d(x, weight, bias=None, initial_states=None, return_final_states=False, activation=None):
    """Semantics of `ssm_core.causal_conv1d_ref`: x (batch, dim, L), weight (dim, K), bias (dim,),
    initial_states (batch, dim, K - 1) = the inputs before x. Returns out (x's dtype) and, with
    return_final_states, the last K - 1 inputs (the tail to carry into the next chunk)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ValueError("x: expected shape (batch, dim, L)")
    b, dim, L = x.shape
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[0] != dim:
        raise ValueError(f"weight: expected shape (dim={dim}, K)")
    K = weight.shape[1]
    if bias is not None and tuple(bias.shape) != (dim,):
        raise ValueError(f"bias: expected shape ({dim},), got {tuple(bias.shape)}")
    if initial_states is not None and tuple(initial_states.shape) != (b, dim, K - 1):
        raise ValueError(f"initial_states: expected shape {(b, dim, K - 1)}, "
                         f"got {tuple(initial_states.shape)}")
    if activation not in (None, "silu"):
        raise ValueError(f"activation: expected None or 'silu', got {activation!r}")
    if K == 1:
        initial_states = None  # no tail to carry
    x_c = x if x.stride(-1) == 1 else x.contiguous()
    out = _CausalConv1dFn.apply(x_c, weight.contiguous(), bias.contiguous() if bias is not None else None,
                                initial_states, activation == "silu")
    if not return_final_states:
        return out
    if initial_states is None:
        initial_states = x.new_zeros(b, dim, K - 1)
    xx = torch.cat([initial_states.to(x.dtype), x[:, :, max(0, L - (K - 1)):]], dim=-1)
    return out, xx[:, :, xx.shape[-1] - (K - 1):]
