"""Depthwise causal conv1d (Mamba's short conv) in Triton, forward and backward, with a carried tail.

    out_i = bias + sum_j w_j x_{i - (K-1) + j}        (x_{-(K-1)} .. x_{-1}: the carried tail, else zeros)

Layout. A program walks a span of tiles of (LANES_T, BLOCK_T, BLOCK_D): BLOCK_T = 8 consecutive steps sit
in each thread's registers (one aligned 16-byte load), LANES_T threads cover the next steps of the same
channels (coalesced rows), the rest of the warp covers channels. The K shifted windows a tap needs are
register picks from the tile and the tile of the 8 steps before it, loaded aligned again (an L1 hit), so
the conv costs K FMAs per output and no unaligned or repeated loads.

Backward: dpre_i = dout_i silu'(pre_i) (pre recomputed), dx_q = sum_k w_{K-1-k} dpre_{q+k} reads the
next 8 steps' dpre too (computed again from an aligned load); dw and dbias are summed in registers over
the span and added with one atomic per (channel, tap) and program (under torch.use_deterministic_algorithms
into the program's own copy, summed in a fixed order: see partial_slots).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import _row, partial_slots, slots_sum


@triton.jit
def _window(a, b, s: tl.constexpr, offs_i, BLOCK_T: tl.constexpr):
    """The tile shifted s steps later (0 <= s <= BLOCK_T), b being a's next BLOCK_T steps: register moves."""
    out = a
    for i in tl.static_range(BLOCK_T):
        if i + s < BLOCK_T:
            v = _row(a, offs_i, i + s)
        else:
            v = _row(b, offs_i, i + s - BLOCK_T)
        out = tl.where((offs_i == i)[None, :, None], v, out)
    return out


@triton.jit
def _x_at(x_ptr, init_ptr, t, L, d3, mask_d3, s_xd, s_id, s_il, K: tl.constexpr, HAS_INIT: tl.constexpr):
    """x at positions t as an fp32 tile: the carried tail for -(K-1) <= t < 0, else 0 outside [0, L)."""
    v = tl.load(x_ptr + d3 * s_xd + t, mask=(t >= 0) & (t < L) & mask_d3, other=0.).to(tl.float32)
    if HAS_INIT:
        v += tl.load(init_ptr + d3 * s_id + (t + K - 1) * s_il, mask=(t < 0) & (t >= 1 - K) & mask_d3,
                     other=0.).to(tl.float32)
    return v


@triton.jit
def _pre(x_prev, x_cur, ws, bias, offs_i, K: tl.constexpr, BLOCK_T: tl.constexpr):
    """bias + sum_j w_j x_{i-(K-1)+j} at x_cur's positions (x_prev: the BLOCK_T steps before them)."""
    acc = tl.zeros_like(x_cur) + bias
    for j in tl.static_range(K):
        acc += ws[j] * _window(x_prev, x_cur, BLOCK_T + j - (K - 1), offs_i, BLOCK_T)
    return acc


@triton.jit
def _dpre(x_prev, x_cur, dout_ptr, t, L, ws, bias, d3, mask_d3, s_od, offs_i, K: tl.constexpr,
          SILU: tl.constexpr, BLOCK_T: tl.constexpr):
    m = (t >= 0) & (t < L) & mask_d3
    g = tl.load(dout_ptr + d3 * s_od + t, mask=m, other=0.).to(tl.float32)
    if SILU:
        pre = _pre(x_prev, x_cur, ws, bias, offs_i, K, BLOCK_T)
        sig = tl.sigmoid(pre)
        g = g * sig * (1. + pre * (1. - sig))
    return tl.where(m, g, 0.)


@triton.jit
def _program(w_ptr, b_ptr, DIM, K: tl.constexpr, HAS_BIAS: tl.constexpr, LANES_T: tl.constexpr,
             BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """Batch row, channel offsets (1, 1, BLOCK_D), in-tile step offsets (LANES_T, BLOCK_T, 1), taps, bias."""
    pid_b = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < DIM
    offs_i = tl.arange(0, BLOCK_T)
    steps = tl.arange(0, LANES_T)[:, None, None] * BLOCK_T + offs_i[None, :, None]
    ws = ()
    for j in tl.static_range(K):
        ws = ws + (tl.load(w_ptr + offs_d * K + j, mask=mask_d, other=0.).to(tl.float32)[None, None, :],)
    bias = tl.zeros([1, 1, BLOCK_D], tl.float32)
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_d, mask=mask_d, other=0.).to(tl.float32)[None, None, :]
    return (pid_b, offs_d, mask_d, offs_d.to(tl.int64)[None, None, :], mask_d[None, None, :], offs_i, steps,
            ws, bias)


@triton.jit
def _conv_fwd_kernel(x_ptr, init_ptr, w_ptr, b_ptr, out_ptr, L, DIM, span,
                     s_xb, s_xd, s_ib, s_id, s_il, s_ob, s_od,
                     K: tl.constexpr, HAS_INIT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
                     LANES_T: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_b, _, _, d3, mask_d3, offs_i, steps, ws, bias = _program(w_ptr, b_ptr, DIM, K, HAS_BIAS, LANES_T,
                                                                 BLOCK_T, BLOCK_D)
    x_ptr += pid_b * s_xb
    init_ptr += pid_b * s_ib
    out_ptr += pid_b * s_ob
    k0 = tl.program_id(2) * span
    for k in range(k0, tl.minimum(k0 + span, tl.cdiv(L, LANES_T * BLOCK_T))):
        t = k * (LANES_T * BLOCK_T) + steps
        x_prev = _x_at(x_ptr, init_ptr, t - BLOCK_T, L, d3, mask_d3, s_xd, s_id, s_il, K, HAS_INIT)
        x_cur = _x_at(x_ptr, init_ptr, t, L, d3, mask_d3, s_xd, s_id, s_il, K, HAS_INIT)
        pre = _pre(x_prev, x_cur, ws, bias, offs_i, K, BLOCK_T)
        if SILU:
            pre = pre * tl.sigmoid(pre)
        tl.store(out_ptr + d3 * s_od + t, pre.to(out_ptr.dtype.element_ty), mask=(t < L) & mask_d3)


@triton.jit
def _conv_bwd_kernel(x_ptr, init_ptr, w_ptr, b_ptr, dout_ptr, dx_ptr, dinit_ptr, dw_ptr, dbias_ptr, L, DIM, span,
                     s_xb, s_xd, s_ib, s_id, s_il, s_ob, s_od, s_gb, s_gd,
                     K: tl.constexpr, HAS_INIT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
                     LANES_T: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                     DETERMINISTIC: tl.constexpr):
    pid_b, offs_d, mask_d, d3, mask_d3, offs_i, steps, ws, bias = _program(w_ptr, b_ptr, DIM, K, HAS_BIAS,
                                                                           LANES_T, BLOCK_T, BLOCK_D)
    x_ptr += pid_b * s_xb
    init_ptr += pid_b * s_ib
    dout_ptr += pid_b * s_ob
    dx_ptr += pid_b * s_gb
    k0 = tl.program_id(2) * span
    k_first = k0
    if HAS_INIT:   # the first program also does the tile before step 0: d(initial_states)
        k_first = tl.where(k0 == 0, -1, k0)
    # Partial sums per lane row; reduced across lanes once, after the walk.
    dws = ()
    for _ in tl.static_range(K):
        dws = dws + (tl.zeros([LANES_T, 1, BLOCK_D], tl.float32),)
    dbias = tl.zeros([LANES_T, 1, BLOCK_D], tl.float32)
    for k in range(k_first, tl.minimum(k0 + span, tl.cdiv(L, LANES_T * BLOCK_T))):
        t = k * (LANES_T * BLOCK_T) + steps
        x_prev = _x_at(x_ptr, init_ptr, t - BLOCK_T, L, d3, mask_d3, s_xd, s_id, s_il, K, HAS_INIT)
        x_cur = _x_at(x_ptr, init_ptr, t, L, d3, mask_d3, s_xd, s_id, s_il, K, HAS_INIT)
        x_next = _x_at(x_ptr, init_ptr, t + BLOCK_T, L, d3, mask_d3, s_xd, s_id, s_il, K, HAS_INIT)
        g = _dpre(x_prev, x_cur, dout_ptr, t, L, ws, bias, d3, mask_d3, s_od, offs_i, K, SILU, BLOCK_T)
        g_next = _dpre(x_cur, x_next, dout_ptr, t + BLOCK_T, L, ws, bias, d3, mask_d3, s_od, offs_i, K, SILU,
                       BLOCK_T)
        dx = tl.zeros_like(g)
        for j in tl.static_range(K):
            dx += ws[K - 1 - j] * _window(g, g_next, j, offs_i, BLOCK_T)
        tl.store(dx_ptr + d3 * s_gd + t, dx.to(dx_ptr.dtype.element_ty), mask=(t >= 0) & (t < L) & mask_d3)
        if HAS_INIT:
            tl.store(dinit_ptr + pid_b * DIM * (K - 1) + d3 * (K - 1) + (t + K - 1),
                     dx.to(dinit_ptr.dtype.element_ty), mask=(t < 0) & (t >= 1 - K) & mask_d3)
        new = ()
        for j in tl.static_range(K):
            xg = g * _window(x_prev, x_cur, BLOCK_T + j - (K - 1), offs_i, BLOCK_T)
            new = new + (dws[j] + tl.sum(xg, axis=1, keep_dims=True),)
        dws = new
        dbias += tl.sum(g, axis=1, keep_dims=True)
    if DETERMINISTIC:   # this program's own copy of dw and dbias (partial_slots), summed on the host
        slot = pid_b * tl.num_programs(2) + tl.program_id(2)
        dw_ptr += slot.to(tl.int64) * DIM * K
        dbias_ptr += slot.to(tl.int64) * DIM
    for j in tl.static_range(K):
        tl.atomic_add(dw_ptr + offs_d * K + j, tl.sum(tl.sum(dws[j], axis=1), axis=0), mask=mask_d, sem="relaxed")
    if HAS_BIAS:
        tl.atomic_add(dbias_ptr + offs_d, tl.sum(tl.sum(dbias, axis=1), axis=0), mask=mask_d, sem="relaxed")


# Tiles per program: enough to amortise the per-program atomics of dw, few enough to fill the GPU at batch 1.
FWD_SPAN = 4
BWD_SPAN = 8


def _launch(x, init, weight, bias, silu: bool, span: int):
    """Grid, leading arguments (strides of x and the tail) and meta-parameters."""
    b, dim, L = x.shape
    K = weight.shape[1]
    ii = init if init is not None else x
    bt = max(8, triton.next_power_of_2(K - 1))   # a tap's window reaches K - 1 steps back into the tile before
    lanes_t = max(1, 32 // bt)
    meta = dict(K=K, HAS_INIT=init is not None, HAS_BIAS=bias is not None, SILU=silu, LANES_T=lanes_t,
                BLOCK_T=bt, BLOCK_D=32, num_warps=4)
    grid = (b, triton.cdiv(dim, 32), triton.cdiv(triton.cdiv(L, lanes_t * bt), span))
    return grid, (x.stride(0), x.stride(1), ii.stride(0), ii.stride(1), ii.stride(2)), meta


def _unit_l(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def conv_fwd(x, weight, bias, init, silu: bool, out=None) -> torch.Tensor:
    """Forward launch. x (b, dim, L) with unit stride along L (other strides free); out, when given, any
    layout with unit stride along L (the fused block writes into its (dim, batch * L) buffer)."""
    b, dim, L = x.shape
    out = torch.empty(b, dim, L, device=x.device, dtype=x.dtype) if out is None else out
    grid, strides, meta = _launch(x, init, weight, bias, silu, FWD_SPAN)
    _conv_fwd_kernel[grid](x, init if init is not None else x, weight, bias, out, L, dim, FWD_SPAN, *strides,
                           out.stride(0), out.stride(1), **meta)
    return out


def conv_bwd(x, weight, bias, init, silu: bool, dout, dx=None):
    """Backward launch: (dx, dinit, dw fp32, dbias fp32). dout and dx: unit stride along L, else free."""
    b, dim, L = x.shape
    K = weight.shape[1]
    dout = _unit_l(dout)
    dx = torch.empty(b, dim, L, device=x.device, dtype=x.dtype) if dx is None else dx
    dinit = torch.empty(b, dim, K - 1, device=x.device, dtype=init.dtype) if init is not None else None
    grid, strides, meta = _launch(x, init, weight, bias, silu, BWD_SPAN)
    slots = partial_slots(grid[0] * grid[2])   # programs that add into one channel's dw
    dw = torch.zeros(slots, dim, K, device=x.device, dtype=torch.float32)
    dbias = torch.zeros(slots, dim, device=x.device, dtype=torch.float32) if bias is not None else None
    _conv_bwd_kernel[grid](x, init if init is not None else x, weight, bias, dout, dx,
                           dinit if dinit is not None else dx, dw, dbias, L, dim, BWD_SPAN, *strides,
                           dout.stride(0), dout.stride(1), dx.stride(0), dx.stride(1), DETERMINISTIC=slots > 1, **meta)
    return dx, dinit, slots_sum(dw), slots_sum(dbias) if dbias is not None else None


class _CausalConv1dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, init, silu):
        out = conv_fwd(x, weight, bias, init, silu)
        ctx.save_for_backward(x, weight, bias, init)
        ctx.silu = silu
        return out

    @staticmethod
    def backward(ctx, dout):
        x, weight, bias, init = ctx.saved_tensors
        dx, dinit, dw, dbias = conv_bwd(x, weight, bias, init, ctx.silu, dout)
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
    out = _CausalConv1dFn.apply(_unit_l(x), weight.contiguous(), bias.contiguous() if bias is not None else None,
                                initial_states, activation == "silu")
    if not return_final_states:
        return out
    if initial_states is None:
        initial_states = x.new_zeros(b, dim, K - 1)
    xx = torch.cat([initial_states.to(x.dtype), x[:, :, max(0, L - (K - 1)):]], dim=-1)
    return out, xx[:, :, xx.shape[-1] - (K - 1):]
