"""Fused Triton selective scan (Mamba-1), forward and backward.

One program owns one (batch, block of BLOCK_D channels) and walks the sequence in chunks of BLOCK_T
steps. Per chunk it discretises (softplus(delta + bias), exp(delta A), delta B u) into a (BLOCK_D,
BLOCK_T, N) register tile, runs an associative scan along time, adds the carried state, contracts with
C, applies the D skip and the silu(z) gate, and writes y. The (batch, dim, L, N) state never touches
global memory: the forward saves only the state at every CKPT_CHUNKS-th chunk boundary.

The backward walks the checkpoint segments in reverse. For each segment it re-runs the forward from the
checkpoint, parking the chunk-start states in a small per-program scratch (L2 resident), then walks the
segment's chunks backwards: recompute h_t in the chunk, reverse-scan the adjoint
    g_t = C_t dy_t + a_{t+1} g_{t+1}
and accumulate every gradient. The reverse recurrence needs a_{t+1} beside dy_t C_t; instead of
shifting a register tile, the scan element carries its own first `a` (see `_rev_combine`).
dB and dC are sums over channels: each program adds its partial tile with fp32 atomics.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _fwd_combine(a_l, b_l, a_r, b_r):
    # h = a_r * (a_l * h0 + b_l) + b_r: left segment first.
    return a_l * a_r, a_r * b_l + b_r


@triton.jit
def _rev_combine(af_r, p_r, g_r, af_l, p_l, g_l):
    # Reverse scan: Triton passes the later segment first. A segment [i..k] carries
    #   af = a_i (its first a), p = a_{i+1}...a_k, g = sum_{s=i..k} a_{i+1}...a_s * dyC_s.
    # Joining [i..k] + [k+1..m] multiplies the right part by p_l * a_{k+1}.
    f = p_l * af_r
    return af_l, f * p_r, g_l + f * g_r


@triton.jit
def _load_chunk(u_ptr, dl_ptr, B_ptr, C_ptr, reset_ptr, bias, A2, t0, L,
                offs_d, mask_d, offs_t, offs_n, mask_n,
                s_ud, s_ul, s_dd, s_dl, s_bn, s_bl, s_cn, s_cl,
                HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_RESET: tl.constexpr):
    """Loads and discretises one chunk. Padded steps (t >= L) and channels get dt = 0, so a = 1 and
    bu = 0: they carry the state through unchanged and contribute nothing."""
    t = t0 + offs_t
    mask_t = t < L
    m2 = mask_t[:, None] & mask_d[None, :]
    d64 = offs_d.to(tl.int64)[None, :]
    u = tl.load(u_ptr + d64 * s_ud + t[:, None] * s_ul, mask=m2, other=0.).to(tl.float32)
    dr = tl.load(dl_ptr + d64 * s_dd + t[:, None] * s_dl, mask=m2, other=0.).to(tl.float32)
    if HAS_BIAS:
        dr += bias[None, :]
    if SOFTPLUS:
        dt = tl.where(dr > 20., dr, tl.log(1. + tl.exp(dr)))  # torch's softplus threshold
    else:
        dt = dr
    dt = tl.where(m2, dt, 0.)
    mbc = mask_t[:, None] & mask_n[None, :]
    Bt = tl.load(B_ptr + t[:, None] * s_bl + offs_n[None, :] * s_bn, mask=mbc, other=0.).to(tl.float32)
    Ct = tl.load(C_ptr + t[:, None] * s_cl + offs_n[None, :] * s_cn, mask=mbc, other=0.).to(tl.float32)
    # Tiles are (BLOCK_T, BLOCK_D, BLOCK_N), time slowest: Triton's default layout spreads the lanes over
    # N then D and leaves time in registers, so the scan along time is (mostly) sequential per thread.
    a = tl.exp2(dt[:, :, None] * A2[None, :, :])
    if HAS_RESET:  # packed sequences: a step that starts a sequence forgets the state before it
        starts = tl.load(reset_ptr + t, mask=mask_t, other=0) != 0
        a = tl.where(starts[:, None, None], 0., a)
    bu = (dt * u)[:, :, None] * Bt[:, None, :]
    return t, mask_t, m2, u, dr, dt, Bt, Ct, a, bu


@triton.jit
def _last_step(x, offs_t, BLOCK_T: tl.constexpr):
    """x[BLOCK_T - 1] of a (BLOCK_T, BLOCK_D, BLOCK_N) tile."""
    return tl.sum(tl.where((offs_t == BLOCK_T - 1)[:, None, None], x, 0.), axis=0)


@triton.jit
def _program_tiles(DIM, N, CH_PER_GROUP, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr):
    """This program's batch, channel block, (channel, state) offsets/masks and B/C group."""
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < DIM
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    mdn = mask_d[:, None] & mask_n[None, :]
    dn = offs_d.to(tl.int64)[:, None] * N + offs_n[None, :]
    grp = (pid_d * BLOCK_D) // CH_PER_GROUP  # BLOCK_D divides CH_PER_GROUP when grouped
    return pid_b, pid_d, offs_d, mask_d, offs_n, mask_n, tl.arange(0, BLOCK_T), mdn, dn, grp


@triton.jit
def _channel_params(A_ptr, bias_ptr, D_ptr, dn, mdn, offs_d, mask_d, BLOCK_D: tl.constexpr,
                    HAS_BIAS: tl.constexpr, HAS_D: tl.constexpr):
    """A (BLOCK_D, N), delta_bias and D (BLOCK_D,) in fp32; zeros for the absent ones."""
    A = tl.load(A_ptr + dn, mask=mdn, other=0.).to(tl.float32)
    bias = tl.zeros([BLOCK_D], tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.).to(tl.float32)
    Dv = tl.zeros([BLOCK_D], tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.).to(tl.float32)
    return A, bias, Dv


@triton.jit
def _scan_fwd_kernel(
        u_ptr, dl_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, reset_ptr, h0_ptr, y_ptr, hT_ptr, ck_ptr,
        L, DIM, N, CH_PER_GROUP, n_chunks, n_ckpt,
        s_ub, s_ud, s_ul, s_db, s_dd, s_dl, s_zb, s_zd, s_zl,
        s_bb, s_bg, s_bn, s_bl, s_cb, s_cg, s_cn, s_cl,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
        HAS_RESET: tl.constexpr, HAS_H0: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
        CKPT_CHUNKS: tl.constexpr):
    pid_b, pid_d, offs_d, mask_d, offs_n, mask_n, offs_t, mdn, dn, grp = _program_tiles(
        DIM, N, CH_PER_GROUP, BLOCK_D, BLOCK_N, BLOCK_T)
    u_ptr += pid_b * s_ub
    dl_ptr += pid_b * s_db
    B_ptr += pid_b * s_bb + grp * s_bg
    C_ptr += pid_b * s_cb + grp * s_cg
    y_ptr += pid_b * DIM * L
    A, bias, Dv = _channel_params(A_ptr, bias_ptr, D_ptr, dn, mdn, offs_d, mask_d, BLOCK_D, HAS_BIAS, HAS_D)
    A2 = A * 1.4426950408889634  # exp(x) = exp2(x * log2 e)
    if HAS_H0:
        h = tl.load(h0_ptr + pid_b * DIM * N + dn, mask=mdn, other=0.)
    else:
        h = tl.zeros([BLOCK_D, BLOCK_N], tl.float32)

    for c in range(n_chunks):
        if c % CKPT_CHUNKS == 0:
            tl.store(ck_ptr + (pid_b * n_ckpt + c // CKPT_CHUNKS) * DIM * N + dn, h, mask=mdn)
        t, _, m2, u, _, _, _, Ct, a, bu = _load_chunk(
            u_ptr, dl_ptr, B_ptr, C_ptr, reset_ptr, bias, A2, c * BLOCK_T, L, offs_d, mask_d, offs_t, offs_n,
            mask_n, s_ud, s_ul, s_dd, s_dl, s_bn, s_bl, s_cn, s_cl, HAS_BIAS, SOFTPLUS, HAS_RESET)
        P, H = tl.associative_scan((a, bu), 0, _fwd_combine)
        hs = H + P * h[None, :, :]
        h = _last_step(hs, offs_t, BLOCK_T)
        y = tl.sum(hs * Ct[:, None, :], axis=2)
        if HAS_D:
            y += Dv[None, :] * u
        if HAS_Z:
            zt = tl.load(z_ptr + pid_b * s_zb + offs_d.to(tl.int64)[None, :] * s_zd + t[:, None] * s_zl,
                         mask=m2, other=0.).to(tl.float32)
            y *= zt * tl.sigmoid(zt)
        tl.store(y_ptr + offs_d.to(tl.int64)[None, :] * L + t[:, None], y.to(y_ptr.dtype.element_ty), mask=m2)
    tl.store(hT_ptr + pid_b * DIM * N + dn, h, mask=mdn)


@triton.jit
def _scan_bwd_kernel(
        u_ptr, dl_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, reset_ptr, ck_ptr, dy_ptr, dhT_ptr,
        scr_ptr,
        du_ptr, ddl_ptr, dz_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dbias_ptr, dh0_ptr,
        L, DIM, N, G, CH_PER_GROUP, n_chunks, n_ckpt,
        s_ub, s_ud, s_ul, s_db, s_dd, s_dl, s_zb, s_zd, s_zl,
        s_bb, s_bg, s_bn, s_bl, s_cb, s_cg, s_cn, s_cl,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
        HAS_RESET: tl.constexpr, HAS_DHT: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
        CKPT_CHUNKS: tl.constexpr):
    pid_b, pid_d, offs_d, mask_d, offs_n, mask_n, offs_t, mdn, dn, grp = _program_tiles(
        DIM, N, CH_PER_GROUP, BLOCK_D, BLOCK_N, BLOCK_T)
    d64 = offs_d.to(tl.int64)[None, :]

    u_ptr += pid_b * s_ub
    dl_ptr += pid_b * s_db
    B_ptr += pid_b * s_bb + grp * s_bg
    C_ptr += pid_b * s_cb + grp * s_cg
    dy_ptr += pid_b * DIM * L
    du_ptr += pid_b * DIM * L
    ddl_ptr += pid_b * DIM * L
    dz_ptr += pid_b * DIM * L
    dB_ptr += (pid_b * G + grp) * N * L
    dC_ptr += (pid_b * G + grp) * N * L
    # Per-program scratch for the chunk-start states of one checkpoint segment.
    scr_ptr += ((pid_b * tl.num_programs(1) + pid_d) * CKPT_CHUNKS) * BLOCK_D * BLOCK_N
    sdn = tl.arange(0, BLOCK_D)[:, None] * BLOCK_N + offs_n[None, :]

    A, bias, Dv = _channel_params(A_ptr, bias_ptr, D_ptr, dn, mdn, offs_d, mask_d, BLOCK_D, HAS_BIAS, HAS_D)
    A2 = A * 1.4426950408889634
    # carry = a_s * g_s of the chunk after the current one: what flows back into its last state.
    if HAS_DHT:
        carry = tl.load(dhT_ptr + pid_b * DIM * N + dn, mask=mdn, other=0.)
    else:
        carry = tl.zeros([BLOCK_D, BLOCK_N], tl.float32)
    dA_acc = tl.zeros([BLOCK_D, BLOCK_N], tl.float32)
    dD_acc = tl.zeros([BLOCK_D], tl.float32)
    dbias_acc = tl.zeros([BLOCK_D], tl.float32)

    n_seg = tl.cdiv(n_chunks, CKPT_CHUNKS)
    for s in range(n_seg):
        seg = n_seg - 1 - s
        h = tl.load(ck_ptr + (pid_b * n_ckpt + seg) * DIM * N + dn, mask=mdn, other=0.)
        # Re-run the forward over the segment to recover each chunk's start state.
        for k in range(CKPT_CHUNKS - 1):
            tl.store(scr_ptr + k * BLOCK_D * BLOCK_N + sdn, h)
            c = seg * CKPT_CHUNKS + k
            if c < n_chunks:
                _, _, _, _, _, _, _, _, a, bu = _load_chunk(
                    u_ptr, dl_ptr, B_ptr, C_ptr, reset_ptr, bias, A2, c * BLOCK_T, L, offs_d, mask_d, offs_t,
                    offs_n, mask_n, s_ud, s_ul, s_dd, s_dl, s_bn, s_bl, s_cn, s_cl, HAS_BIAS, SOFTPLUS,
                    HAS_RESET)
                P, H = tl.associative_scan((a, bu), 0, _fwd_combine)
                h = _last_step(H + P * h[None, :, :], offs_t, BLOCK_T)
        tl.store(scr_ptr + (CKPT_CHUNKS - 1) * BLOCK_D * BLOCK_N + sdn, h)
        tl.debug_barrier()

        for kr in range(CKPT_CHUNKS):
            k = CKPT_CHUNKS - 1 - kr
            c = seg * CKPT_CHUNKS + k
            if c < n_chunks:
                h_start = tl.load(scr_ptr + k * BLOCK_D * BLOCK_N + sdn)
                t, mask_t, m2, u, dr, dt, Bt, Ct, a, bu = _load_chunk(
                    u_ptr, dl_ptr, B_ptr, C_ptr, reset_ptr, bias, A2, c * BLOCK_T, L, offs_d, mask_d, offs_t,
                    offs_n, mask_n, s_ud, s_ul, s_dd, s_dl, s_bn, s_bl, s_cn, s_cl, HAS_BIAS, SOFTPLUS,
                    HAS_RESET)
                P, H = tl.associative_scan((a, bu), 0, _fwd_combine)
                hs = H + P * h_start[None, :, :]                        # h_t
                io = d64 * L + t[:, None]                               # (BLOCK_T, BLOCK_D) offsets
                dy = tl.load(dy_ptr + io, mask=m2, other=0.).to(tl.float32)
                if HAS_Z:
                    zt = tl.load(z_ptr + pid_b * s_zb + d64 * s_zd + t[:, None] * s_zl,
                                 mask=m2, other=0.).to(tl.float32)
                    sig = tl.sigmoid(zt)
                    y = tl.sum(hs * Ct[:, None, :], axis=2) + Dv[None, :] * u
                    dz = dy * y * sig * (1. + zt * (1. - sig))
                    tl.store(dz_ptr + io, dz.to(dz_ptr.dtype.element_ty), mask=m2)
                    dy = dy * zt * sig
                dD_acc += tl.sum(dy * u, axis=0)
                dyC = dy[:, :, None] * Ct[:, None, :]
                ones = tl.full([BLOCK_T, BLOCK_D, BLOCK_N], 1., tl.float32)
                _, Pr, Gr = tl.associative_scan((a, ones, dyC), 0, _rev_combine, reverse=True)
                g = Gr + Pr * carry[None, :, :]                         # dLoss/dh_t
                carry = tl.sum(tl.where((offs_t == 0)[:, None, None], a * g, 0.), axis=0)
                mtn = mask_t[:, None] & mask_n[None, :]
                tn = offs_n[None, :] * L + t[:, None]
                tl.atomic_add(dC_ptr + tn, tl.sum(dy[:, :, None] * hs, axis=1), mask=mtn, sem="relaxed")
                gd = g * (hs - bu)                                      # g_t * a_t * h_{t-1}
                dA_acc += tl.sum(gd * dt[:, :, None], axis=0)
                gB = tl.sum(g * Bt[:, None, :], axis=2)
                tl.atomic_add(dB_ptr + tn, tl.sum(g * (dt * u)[:, :, None], axis=1), mask=mtn, sem="relaxed")
                du = dy * Dv[None, :] + dt * gB
                ddt = tl.sum(gd * A[None, :, :], axis=2) + u * gB
                if SOFTPLUS:
                    ddt = ddt * tl.sigmoid(dr)
                ddt = tl.where(m2, ddt, 0.)
                dbias_acc += tl.sum(ddt, axis=0)
                tl.store(du_ptr + io, du.to(du_ptr.dtype.element_ty), mask=m2)
                tl.store(ddl_ptr + io, ddt.to(ddl_ptr.dtype.element_ty), mask=m2)
        tl.debug_barrier()

    tl.store(dh0_ptr + pid_b * DIM * N + dn, carry, mask=mdn)
    tl.store(dA_ptr + pid_b * DIM * N + dn, dA_acc, mask=mdn)
    tl.store(dD_ptr + pid_b * DIM + offs_d, dD_acc, mask=mask_d)
    tl.store(dbias_ptr + pid_b * DIM + offs_d, dbias_acc, mask=mask_d)


# ------------------------------------------------------------------------------------------------------
# Launch configuration
# ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ScanConfig:
    """Tile sizes. BLOCK_T is shared by forward and backward (checkpoints sit on chunk boundaries)."""
    block_t: int
    block_d_fwd: int
    block_d_bwd: int
    ckpt_chunks: int      # checkpoint every ckpt_chunks * block_t steps
    warps_fwd: int = 4
    warps_bwd: int = 4


def _pow2_divisor(n: int, cap: int) -> int:
    """Largest power of two <= cap that divides n."""
    p = 1
    while p * 2 <= cap and n % (p * 2) == 0:
        p *= 2
    return p


def default_config(dim: int, L: int, N: int, groups: int = 1, batch: int = 8, warps: int | None = None,
                   block_t: int | None = None, ckpt_bytes_per_step: float = 1.5) -> ScanConfig:
    """Tiles matched to Triton's default layout of a (BLOCK_T, BLOCK_D, BLOCK_N) tensor: the 32 lanes of a
    warp cover N (then D), the warps cover D, time stays in each thread's registers. So BLOCK_D is
    (lanes left over by N) * warps, and BLOCK_T is sized to keep the backward's ~8 live tiles in registers.
    Few warps per program when batch * dim is small, so that the grid still fills the GPU.
    Checkpoints cost N*4/(ckpt_chunks*block_t) bytes per (batch, channel, step): about ckpt_bytes_per_step,
    which keeps the saved state plus y below what the anchor saves (y and y*silu(z))."""
    bn = triton.next_power_of_2(N)
    lanes_d = max(1, 32 // bn)
    per_thread_n = max(1, bn // 32)
    if warps is None:
        # Measured on an H100 at (8, 1536, 16, 2048), forward+backward: 1 warp 4.6 ms, 2 warps 8.1, 4 warps
        # 8.3 (one warp per program needs no cross-warp reductions for dB, dC and the N contraction).
        warps = 1 if bn <= 32 else 4
        while warps > 1 and batch * dim / (lanes_d * warps) < 4 * 132:
            warps //= 2
    # 32 steps per thread for N <= 32 (measured faster than 16 despite some backward spills).
    bt = block_t or (32 if bn <= 32 else max(2, 16 // per_thread_n))
    bt = max(2, min(bt, triton.next_power_of_2(L)))
    bd = min(lanes_d * warps, triton.next_power_of_2(dim))
    if groups > 1:  # a program's channels must share one B/C group
        bd = _pow2_divisor(dim // groups, bd)
    ckpt_chunks = max(1, min(16, math.ceil(N * 4 / (ckpt_bytes_per_step * bt)), triton.cdiv(L, bt)))
    return ScanConfig(bt, bd, bd, ckpt_chunks, warps, warps)


# ------------------------------------------------------------------------------------------------------
# Host side
# ------------------------------------------------------------------------------------------------------
def _last_contig(x: torch.Tensor | None) -> torch.Tensor | None:
    # Chunks read along L: keep that axis unit-stride (as the anchor does).
    if x is None or x.stride(-1) == 1:
        return x
    return x.contiguous()


def _bc_strides(X: torch.Tensor) -> tuple[int, int, int, int]:
    if X.dim() == 3:
        return X.stride(0), 0, X.stride(1), X.stride(2)
    return X.stride(0), X.stride(1), X.stride(2), X.stride(3)


def _flags(D, z, delta_bias, softplus, reset):
    return dict(HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
                SOFTPLUS=bool(softplus), HAS_RESET=reset is not None)


def _scan_fwd(u, delta, A, B, C, D, z, delta_bias, softplus, h0, reset, cfg: ScanConfig):
    b, dim, L = u.shape
    N = A.shape[1]
    G = 1 if B.dim() == 3 else B.shape[1]
    n_chunks = triton.cdiv(L, cfg.block_t)
    n_ckpt = triton.cdiv(n_chunks, cfg.ckpt_chunks)
    y = torch.empty(b, dim, L, device=u.device, dtype=u.dtype)
    hT = torch.empty(b, dim, N, device=u.device, dtype=torch.float32)
    ck = torch.empty(b, n_ckpt, dim, N, device=u.device, dtype=torch.float32)
    zz = z if z is not None else u
    grid = (b, triton.cdiv(dim, cfg.block_d_fwd))
    _scan_fwd_kernel[grid](
        u, delta, A, B, C, D, zz, delta_bias, reset, h0, y, hT, ck,
        L, dim, N, dim // G, n_chunks, n_ckpt,
        *u.stride(), *delta.stride(), *zz.stride(), *_bc_strides(B), *_bc_strides(C),
        HAS_H0=h0 is not None, BLOCK_D=cfg.block_d_fwd, BLOCK_T=cfg.block_t,
        BLOCK_N=triton.next_power_of_2(N), CKPT_CHUNKS=cfg.ckpt_chunks, num_warps=cfg.warps_fwd,
        **_flags(D, z, delta_bias, softplus, reset))
    return y, hT, ck


def _scan_bwd(u, delta, A, B, C, D, z, delta_bias, softplus, reset, ck, dy, dhT, cfg: ScanConfig):
    b, dim, L = u.shape
    N = A.shape[1]
    G = 1 if B.dim() == 3 else B.shape[1]
    dev = u.device
    n_chunks = triton.cdiv(L, cfg.block_t)
    bn = triton.next_power_of_2(N)
    n_db = triton.cdiv(dim, cfg.block_d_bwd)
    f32 = dict(device=dev, dtype=torch.float32)
    scratch = torch.empty(b * n_db * cfg.ckpt_chunks * cfg.block_d_bwd * bn, **f32)
    du = torch.empty(b, dim, L, device=dev, dtype=u.dtype)
    ddelta = torch.empty(b, dim, L, device=dev, dtype=delta.dtype)
    dz = torch.empty(b, dim, L, device=dev, dtype=z.dtype) if z is not None else du
    dB = torch.zeros(b, G, N, L, **f32)
    dC = torch.zeros(b, G, N, L, **f32)
    dA = torch.empty(b, dim, N, **f32)
    dD = torch.empty(b, dim, **f32)
    dbias = torch.empty(b, dim, **f32)
    dh0 = torch.empty(b, dim, N, **f32)
    zz = z if z is not None else u
    _scan_bwd_kernel[(b, n_db)](
        u, delta, A, B, C, D, zz, delta_bias, reset, ck, dy, dhT, scratch,
        du, ddelta, dz, dA, dB, dC, dD, dbias, dh0,
        L, dim, N, G, dim // G, n_chunks, ck.shape[1],
        *u.stride(), *delta.stride(), *zz.stride(), *_bc_strides(B), *_bc_strides(C),
        HAS_DHT=dhT is not None, BLOCK_D=cfg.block_d_bwd, BLOCK_T=cfg.block_t, BLOCK_N=bn,
        CKPT_CHUNKS=cfg.ckpt_chunks, num_warps=cfg.warps_bwd, **_flags(D, z, delta_bias, softplus, reset))
    if B.dim() == 3:
        dB, dC = dB[:, 0], dC[:, 0]
    return (du, ddelta, dA.sum(0), dB, dC, dD.sum(0), dz if z is not None else None, dbias.sum(0), dh0)


class _SelectiveScanFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, h0, softplus, cfg, reset):
        y, hT, ck = _scan_fwd(u, delta, A, B, C, D, z, delta_bias, softplus, h0, reset, cfg)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, ck)
        ctx.softplus, ctx.cfg, ctx.reset = softplus, cfg, reset
        ctx.set_materialize_grads(False)
        return y, hT

    @staticmethod
    def backward(ctx, dy, dhT):
        u, delta, A, B, C, D, z, delta_bias, ck = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros_like(u)
        dy = dy.contiguous()
        dhT = dhT.float().contiguous() if dhT is not None else None
        du, ddelta, dA, dB, dC, dD, dz, dbias, dh0 = _scan_bwd(
            u, delta, A, B, C, D, z, delta_bias, ctx.softplus, ctx.reset, ck, dy, dhT, ctx.cfg)
        grads = (du, ddelta, dA, dB, dC, dD, dz, dbias, dh0)
        inputs = (u, delta, A, B, C, D, z, delta_bias, None)  # saved_tensors may be unpacked only once (checkpoint)
        grads = tuple(g.to(x.dtype) if (g is not None and x is not None and need) else (g if need else None)
                      for g, x, need in zip(grads, inputs, ctx.needs_input_grad))
        return (*grads, None, None, None)


def _check(u, delta, A, B, C, D, z, delta_bias, h0) -> None:
    """Cheap structural checks; the reference (ssm_core.reference.check_scan_inputs) names every shape."""
    if not isinstance(u, torch.Tensor) or u.dim() != 3:
        raise ValueError("u: expected a tensor of shape (batch, dim, L)")
    b, dim, L = u.shape
    if L < 1:
        raise ValueError("u: sequence length L must be >= 1")
    if u.dtype == torch.float64:
        raise ValueError("kernels.selective_scan computes in float32; "
                         "use ssm_core.selective_scan_ref for float64")
    if tuple(delta.shape) != (b, dim, L) or A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"delta/A: expected delta (b, dim, L)={(b, dim, L)} and A (dim={dim}, N)")
    N = A.shape[1]
    G = 1 if B.dim() == 3 else B.shape[1]
    want = (b, N, L) if B.dim() == 3 else (b, G, N, L)
    if tuple(B.shape) != want or tuple(C.shape) != want or dim % G:
        raise ValueError(f"B, C: expected shape {want} with groups dividing dim={dim}")
    for name, t, shape in (("D", D, (dim,)), ("z", z, (b, dim, L)), ("delta_bias", delta_bias, (dim,)),
                           ("h0", h0, (b, dim, N))):
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")


def _starts_mask(cu_seqlens, b, L, h0, return_final_state, device) -> torch.Tensor | None:
    """(L,) int8, 1 where a packed sequence starts (after the first): there the scan drops its state."""
    if cu_seqlens is None:
        return None
    if b != 1 or h0 is not None or return_final_state:
        raise ValueError("cu_seqlens: packed sequences need batch 1, no h0 and no return_final_state")
    cu = torch.as_tensor(cu_seqlens, device=device).long()
    if cu.dim() != 1 or cu.numel() < 2 or cu[0] != 0 or cu[-1] != L or bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(f"cu_seqlens: expected increasing offsets from 0 to L={L}, got {cu.tolist()}")
    starts = torch.zeros(L, dtype=torch.int8, device=device)
    starts[cu[1:-1][cu[1:-1] < L]] = 1
    return starts


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, h0=None,
                   return_final_state=False, config: ScanConfig | None = None, cu_seqlens=None):
    """Fused selective scan; signature and semantics of `ssm_core.selective_scan_ref`.

    u, delta, z: (batch, dim, L) fp32/fp16/bf16; A: (dim, N); B, C: (batch, N, L) or (batch, G, N, L);
    D, delta_bias: (dim,); h0: (batch, dim, N). Returns y (u's dtype) and, with return_final_state, the final
    state (batch, dim, N) fp32. Differentiable in every tensor input, h0 and the final state included.

    cu_seqlens (num_seqs + 1,) integer offsets [0, ..., L]: variable-length sequences packed along L of
    batch 1; each starts from a zero state (no h0 / final state in this mode).
    """
    _check(u, delta, A, B, C, D, z, delta_bias, h0)
    b, dim, L = u.shape
    reset = _starts_mask(cu_seqlens, b, L, h0, return_final_state, u.device)
    G = 1 if B.dim() == 3 else B.shape[1]
    cfg = config or default_config(dim, L, A.shape[1], G, batch=b)
    if G > 1:  # a program's channels must share one B/C group
        cfg = dataclasses.replace(cfg, block_d_fwd=_pow2_divisor(dim // G, cfg.block_d_fwd),
                                  block_d_bwd=_pow2_divisor(dim // G, cfg.block_d_bwd))
    u, delta, z, B, C = (_last_contig(t) for t in (u, delta, z, B, C))
    A = A.float().contiguous() if A.dtype != torch.float32 or not A.is_contiguous() else A
    D = D.float().contiguous() if D is not None else None
    delta_bias = delta_bias.float().contiguous() if delta_bias is not None else None
    h0 = h0.float().contiguous() if h0 is not None else None
    y, hT = _SelectiveScanFn.apply(u, delta, A, B, C, D, z, delta_bias, h0, bool(delta_softplus), cfg, reset)
    return (y, hT) if return_final_state else y
