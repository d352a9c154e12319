"""One decoding step of the selective SSM, fused in one Triton launch: discretise, update the state in
place, contract with C, D skip and silu(z) gate. The state (batch, dim, N) is read and written once."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import _softplus, group_strides


@triton.jit
def _state_update_kernel(state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, y_ptr,
                         DIM, N, CH_PER_GROUP,
                         s_sb, s_sd, s_sn, s_xb, s_xd, s_tb, s_td, s_zb, s_zd,
                         s_bb, s_bg, s_bn, s_cb, s_cg, s_cn,
                         HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                         SOFTPLUS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_b = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < DIM
    mask_n = offs_n < N
    mdn = mask_d[:, None] & mask_n[None, :]
    grp = offs_d // CH_PER_GROUP  # per channel: any dim / group split works
    s_ptrs = state_ptr + pid_b * s_sb + offs_d[:, None] * s_sd + offs_n[None, :] * s_sn
    h = tl.load(s_ptrs, mask=mdn, other=0.)
    x = tl.load(x_ptr + pid_b * s_xb + offs_d * s_xd, mask=mask_d, other=0.).to(tl.float32)
    dt = tl.load(dt_ptr + pid_b * s_tb + offs_d * s_td, mask=mask_d, other=0.).to(tl.float32)
    if HAS_BIAS:
        dt += tl.load(bias_ptr + offs_d, mask=mask_d, other=0.).to(tl.float32)
    if SOFTPLUS:
        dt = _softplus(dt)
    A = tl.load(A_ptr + offs_d[:, None] * N + offs_n[None, :], mask=mdn, other=0.).to(tl.float32)
    gn = grp[:, None] * s_bg + offs_n[None, :] * s_bn
    B = tl.load(B_ptr + pid_b * s_bb + gn, mask=mdn, other=0.).to(tl.float32)
    C = tl.load(C_ptr + pid_b * s_cb + grp[:, None] * s_cg + offs_n[None, :] * s_cn, mask=mdn,
                other=0.).to(tl.float32)
    h = tl.exp2(dt[:, None] * A * 1.4426950408889634) * h + (dt * x)[:, None] * B
    tl.store(s_ptrs, h.to(state_ptr.dtype.element_ty), mask=mdn)
    y = tl.sum(h * C, axis=1)
    if HAS_D:
        y += x * tl.load(D_ptr + offs_d, mask=mask_d, other=0.).to(tl.float32)
    if HAS_Z:
        z = tl.load(z_ptr + pid_b * s_zb + offs_d * s_zd, mask=mask_d, other=0.).to(tl.float32)
        y *= z * tl.sigmoid(z)
    tl.store(y_ptr + pid_b * DIM + offs_d, y.to(y_ptr.dtype.element_ty), mask=mask_d)


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """Semantics of `ssm_core.selective_state_update_ref`: state (batch, dim, N) updated in place;
    x, dt, z (batch, dim); A (dim, N); B, C (batch, N) or (batch, G, N). Returns y (batch, dim) in x's dtype.
    Not differentiable (decoding)."""
    if not isinstance(state, torch.Tensor) or state.dim() != 3:
        raise ValueError("state: expected shape (batch, dim, N)")
    b, dim, N = state.shape
    if state.dtype == torch.float64:
        raise ValueError("kernels.selective_state_update computes in float32; use the reference for float64")
    for name, t in (("x", x), ("dt", dt), ("z", z)):
        if t is not None and tuple(t.shape) != (b, dim):
            raise ValueError(f"{name}: expected shape {(b, dim)}, got {tuple(t.shape)}")
    G = 1 if B.dim() == 2 else B.shape[1]
    if tuple(A.shape) != (dim, N) or B.shape != C.shape or B.shape[-1] != N or dim % G:
        raise ValueError(f"A/B/C: expected A {(dim, N)} and B, C (batch, N) or (batch, G, N) with G | {dim}")
    A = A.float().contiguous()
    D, dt_bias = (v.contiguous() if v is not None else None for v in (D, dt_bias))  # read as flat (dim,)
    y = torch.empty(b, dim, device=x.device, dtype=x.dtype)
    zz = z if z is not None else x
    block_n = triton.next_power_of_2(N)
    block_d = max(1, min(64, 2048 // block_n, triton.next_power_of_2(dim)))
    _state_update_kernel[(b, triton.cdiv(dim, block_d))](
        state, x, dt, A, B, C, D, zz, dt_bias, y, dim, N, dim // G,
        *state.stride(), *x.stride(), *dt.stride(), *zz.stride(), *group_strides(B, 2), *group_strides(C, 2),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=dt_bias is not None, SOFTPLUS=bool(dt_softplus),
        BLOCK_D=block_d, BLOCK_N=block_n, num_warps=4)
    return y
