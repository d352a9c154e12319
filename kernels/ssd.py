"""Triton fast path for Mamba-2's chunked SSD, forward and backward, with initial and final states.

Semantics and arguments of `ssm_core.reference.ssd_chunk_scan_ref` (= mamba_ssm's mamba_chunk_scan_combined):
x (b, L, h, p), dt (b, L, h), A (h,), B, C (b, L, g, n), D (h,) or (h, p), z like x, dt_bias (h,),
initial_states / final state (b, h, p, n) float32.

Forward, four launches (Q = chunk_size):
  _dt_cumsum      dt = softplus(dt + bias) and cs = cumsum(dt * A) within each chunk  -> (b, h, L) fp32
  _chunk_outer    each chunk's own state  S_c = sum_t exp(cs_end - cs_t) dt_t x_t B_t^T   (p, n) per head
  _state_pass     S_c -> the state at each chunk's start (sequential over groups of chunks, elementwise)
  _chunk_scan     y_i = sum_{j<=i} (C_i.B_j) exp(cs_i - cs_j) dt_j x_j + exp(cs_i) C_i s_start + D x_i
                  in tiles of block_m rows (SSDConfig): the quadratic (attention-like) form within a chunk.
Backward, five launches, the same structure transposed:
  _chunk_outer    (mode 1) each chunk's local state gradient  sum_i exp(cs_i) dy_i^T C_i
  _dstate_pass    reverse pass: the gradient at each chunk's end, d(initial_states), d(chunk decay)
  _bwd_dx         per key tile j and head: dx, d(dt) and the key part of d(cs)
  _bwd_db         per key tile j and a few heads of a group: dB, the heads summed before the product with C
  _bwd_dc         per query tile i and a few heads of a group: dC (likewise) and the query part of d(cs)
and a few (b, h, L)-sized PyTorch ops to turn d(cs) into d(dt), d(A), d(dt_bias).
Matmul operands are cast to the input dtype (bf16 inputs -> bf16 tensor-core matmuls, fp32 accumulate).
The chunk-start states and the chunk-end state gradients, (b, h, chunks, p, n) each and read by every tile
of their chunk, are also written in that dtype by the passes that make them (the states stay in fp32 too,
for the d(decay) sums of _dstate_pass): the tile kernels read half the bytes, with the rounding their
matmuls did anyway (H100, batch 8, L 8192, d_state 128: forward+backward 5.16 -> 4.95 ms).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import _softplus, partial_slots, slots_sum


@triton.jit
def _dt_cumsum(dt_ptr, bias_ptr, A_ptr, DT_ptr, CS_ptr, L, H, Lp,
               HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, Q: tl.constexpr):
    c, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    t = c * Q + tl.arange(0, Q)
    m = t < L
    d = tl.load(dt_ptr + (b * L + t).to(tl.int64) * H + h, mask=m, other=0.).to(tl.float32)
    if HAS_BIAS:
        d += tl.load(bias_ptr + h).to(tl.float32)
    if SOFTPLUS:
        d = _softplus(d)
    d = tl.where(m, d, 0.)  # padded steps: no input and no decay
    cs = tl.cumsum(d * tl.load(A_ptr + h).to(tl.float32), axis=0)
    base = bh.to(tl.int64) * Lp + t
    tl.store(DT_ptr + base, d)
    tl.store(CS_ptr + base, cs)


@triton.jit
def _chunk_outer(X_ptr, Y_ptr, DT_ptr, CS_ptr, OUT_ptr, L, H, G, Lp, nc, P, N,
                 MODE: tl.constexpr, Q: tl.constexpr, BK: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr):
    """OUT[b, h, c] (p, n) = sum_t w_t X_t^T Y_t over chunk c. MODE 0: w = exp(cs_end - cs_t) dt_t (the chunk's
    state, X = x, Y = B); MODE 1: w = exp(cs_t) (the local state gradient, X = dy, Y = C)."""
    # One grid axis, (batch, chunk, head, N block) with the N blocks and heads fastest: the programs reading one
    # chunk's x rows and B run side by side and share them in L2. (Chunk-fastest, at batch 1 and long L every
    # head re-read B from memory, and every N block x: 2.83 vs 1.67 ms on an H100 at L 262144, d_state 128.)
    nnb = tl.cdiv(N, BN)
    pid = tl.program_id(0)
    nb, hc = pid % nnb, pid // nnb
    h, bc = hc % H, hc // H
    b, c = bc // nc, bc % nc
    bh = b * H + h
    g = h // (H // G)
    offs_p, offs_n = tl.arange(0, BP), nb * BN + tl.arange(0, BN)
    mp, mn = offs_p < P, offs_n < N
    cs_end = tl.load(CS_ptr + bh.to(tl.int64) * Lp + c * Q + Q - 1)
    acc = tl.zeros((BP, BN), dtype=tl.float32)
    for k0 in range(0, Q, BK):
        t = c * Q + k0 + tl.arange(0, BK)
        mt = t < L
        row = (b * L + t).to(tl.int64)
        xk = tl.load(X_ptr + (row * H + h)[:, None] * P + offs_p[None, :], mask=mt[:, None] & mp[None, :], other=0.)
        yk = tl.load(Y_ptr + (row * G + g)[:, None] * N + offs_n[None, :], mask=mt[:, None] & mn[None, :], other=0.)
        cs = tl.load(CS_ptr + bh.to(tl.int64) * Lp + t)
        if MODE == 0:
            w = tl.exp(cs_end - cs) * tl.load(DT_ptr + bh.to(tl.int64) * Lp + t)
        else:
            w = tl.exp(cs)
        xw = (xk.to(tl.float32) * w[:, None]).to(yk.dtype)
        acc += tl.dot(tl.trans(xw), yk)
    out = OUT_ptr + ((bh.to(tl.int64) * nc + c) * P + offs_p[:, None]) * N + offs_n[None, :]
    tl.store(out, acc, mask=mp[:, None] & mn[None, :])


@triton.jit
def _affine(a1, b1, a2, b2):
    """Compose two steps of s -> a s + b: first (a1, b1), then (a2, b2). For tl.associative_scan."""
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _state_pass(S_ptr, SX_ptr, CS_ptr, H0_ptr, FIN_ptr, Lp, nc, PN, Q: tl.constexpr, HAS_H0: tl.constexpr,
                BLOCK: tl.constexpr, CPG: tl.constexpr):
    """In place: S[b, h, c] <- the state at the start of chunk c, and the same in SX (the matmul dtype, read
    by _chunk_scan and _bwd_dc: half the bytes of fp32 at bf16, rounded as their matmuls round it anyway);
    FIN <- the state after the last chunk.
    The chunks are walked CPG at a time: one group's CPG local states are loaded together and combined by an
    associative scan of s -> exp(cs_end) s + local, so a program waits one memory latency per group rather
    than per chunk (at batch 1 the walk over thousands of chunks is latency bound)."""
    bh, blk = tl.program_id(0), tl.program_id(1)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    m = offs < PN
    rows = tl.arange(0, CPG)
    s = tl.zeros((BLOCK,), dtype=tl.float32)
    if HAS_H0:
        s = tl.load(H0_ptr + bh.to(tl.int64) * PN + offs, mask=m, other=0.)
    for c0 in range(0, nc, CPG):
        c = c0 + rows
        mc = c < nc
        # Chunks past the end: decay exp(0) = 1 and no local state, the identity.
        dec = tl.exp(tl.load(CS_ptr + bh.to(tl.int64) * Lp + c * Q + Q - 1, mask=mc, other=0.))
        ptr = S_ptr + (bh.to(tl.int64) * nc + c)[:, None] * PN + offs[None, :]
        local = tl.load(ptr, mask=mc[:, None] & m[None, :], other=0.)
        a, b = tl.associative_scan((tl.broadcast_to(dec[:, None], (CPG, BLOCK)), local), 0, _affine)
        after = a * s[None, :] + b  # row r: the state after chunk c0 + r
        # Chunk c0 starts from the carried state, chunk c + 1 from row r (stored one chunk on; the group's
        # last row is the next group's carry: its slot is not loaded yet).
        first = (bh.to(tl.int64) * nc + c0) * PN + offs
        tl.store(S_ptr + first, s, mask=m)
        tl.store(SX_ptr + first, s.to(SX_ptr.dtype.element_ty), mask=m)
        rest = (bh.to(tl.int64) * nc + c + 1)[:, None] * PN + offs[None, :]
        m_rest = ((rows < CPG - 1) & (c + 1 < nc))[:, None] & m[None, :]
        tl.store(S_ptr + rest, after, mask=m_rest)
        tl.store(SX_ptr + rest, after.to(SX_ptr.dtype.element_ty), mask=m_rest)
        s = tl.sum(tl.where(rows[:, None] == CPG - 1, after, 0.), axis=0)
    tl.store(FIN_ptr + bh.to(tl.int64) * PN + offs, s, mask=m)


@triton.jit
def _head_tile(L, H, G, P, N, Q: tl.constexpr, BM: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr):
    """What a one-head tile program (_chunk_scan, _bwd_dx) works on: grid axis 0 is (chunk c, BM-row tile
    starting at r0 in it), axis 1 is (batch b, head h). Returns those, b * H + h, the head's group, the p/n
    offsets and masks, and the tile's positions t, their mask and (b * L + t) rows."""
    blk, bh = tl.program_id(0), tl.program_id(1)
    mpc = Q // BM
    c, r0 = blk // mpc, (blk % mpc) * BM
    b, h = bh // H, bh % H
    offs_p, offs_n = tl.arange(0, BP), tl.arange(0, BN)
    t = c * Q + r0 + tl.arange(0, BM)
    return (c, r0, b, h, bh, h // (H // G), offs_p, offs_n, offs_p < P, offs_n < N, t, t < L,
            (b * L + t).to(tl.int64))


@triton.jit
def _chunk_scan(X_ptr, DT_ptr, CS_ptr, B_ptr, C_ptr, S_ptr, D_ptr, Z_ptr, Y_ptr, YPRE_ptr,
                L, H, G, Lp, nc, P, N,
                HAS_D: tl.constexpr, D_HDIM: tl.constexpr, HAS_Z: tl.constexpr,
                Q: tl.constexpr, BM: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr):
    c, m0, b, h, bh, g, offs_p, offs_n, mp, mn, ti, mi, rowi = _head_tile(L, H, G, P, N, Q, BM, BP, BN)
    cbase = bh.to(tl.int64) * Lp
    cs_i = tl.load(CS_ptr + cbase + ti)
    Ci = tl.load(C_ptr + (rowi * G + g)[:, None] * N + offs_n[None, :], mask=mi[:, None] & mn[None, :], other=0.)
    # The incoming state's part: exp(cs_i) * C_i s_start^T.
    st = tl.load(S_ptr + ((bh.to(tl.int64) * nc + c) * P + offs_p[None, :]) * N + offs_n[:, None],
                 mask=mn[:, None] & mp[None, :], other=0.)
    acc = tl.dot(Ci, st.to(Ci.dtype)) * tl.exp(cs_i)[:, None]
    # Within the chunk: causal tiles j <= i.
    for k0 in range(0, m0 + BM, BM):
        tj = c * Q + k0 + tl.arange(0, BM)
        mj = tj < L
        rowj = (b * L + tj).to(tl.int64)
        Bj = tl.load(B_ptr + (rowj * G + g)[:, None] * N + offs_n[None, :], mask=mj[:, None] & mn[None, :], other=0.)
        xj = tl.load(X_ptr + (rowj * H + h)[:, None] * P + offs_p[None, :], mask=mj[:, None] & mp[None, :], other=0.)
        cs_j = tl.load(CS_ptr + cbase + tj)
        dt_j = tl.load(DT_ptr + cbase + tj)
        causal = (m0 + tl.arange(0, BM))[:, None] >= (k0 + tl.arange(0, BM))[None, :]
        decay = tl.exp(tl.where(causal, cs_i[:, None] - cs_j[None, :], float("-inf")))
        cb = tl.dot(Ci, tl.trans(Bj)) * decay * dt_j[None, :]
        acc += tl.dot(cb.to(xj.dtype), xj)
    mask = mi[:, None] & mp[None, :]
    xoff = (rowi * H + h)[:, None] * P + offs_p[None, :]
    if HAS_D:
        xi = tl.load(X_ptr + xoff, mask=mask, other=0.).to(tl.float32)
        if D_HDIM:
            acc += xi * tl.load(D_ptr + h * P + offs_p, mask=mp, other=0.)[None, :]
        else:
            acc += xi * tl.load(D_ptr + h)
    if HAS_Z:
        tl.store(YPRE_ptr + xoff, acc.to(YPRE_ptr.dtype.element_ty), mask=mask)
        zi = tl.load(Z_ptr + xoff, mask=mask, other=0.).to(tl.float32)
        acc = acc * zi * tl.sigmoid(zi)
    tl.store(Y_ptr + xoff, acc.to(Y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dstate_pass(DS_ptr, DSX_ptr, S_ptr, FIN_ptr, CS_ptr, DFIN_ptr, DH0_ptr, DDEC_ptr, Lp, nc, PN,
                 Q: tl.constexpr, HAS_DFIN: tl.constexpr, BLOCK: tl.constexpr, CPG: tl.constexpr):
    """Reverse over chunks, CPG at a time as in _state_pass (rows in descending chunk order, so that the scan
    runs forward). In: DS[c] = the chunk's local gradient (from _chunk_outer mode 1), S[c] = the state at chunk
    c's start. Out: DSX[c] (the matmul dtype; may be DS itself) <- the gradient w.r.t. the state at chunk c's
    END; DH0; and DDEC[b, h, blk, c] = this block's part of <dS_end_c, s_end_c>, the gradient w.r.t. cs at the
    chunk's last step (its decay). A slot of DS is overwritten only after it was read."""
    bh, blk = tl.program_id(0), tl.program_id(1)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    m = offs < PN
    rows = tl.arange(0, CPG)
    ddec_ptr = DDEC_ptr + (bh.to(tl.int64) * tl.num_programs(1) + blk) * nc
    fin = tl.load(FIN_ptr + bh.to(tl.int64) * PN + offs, mask=m, other=0.)
    ds = tl.zeros((BLOCK,), dtype=tl.float32)  # the gradient at the end of the group's top chunk
    if HAS_DFIN:
        ds = tl.load(DFIN_ptr + bh.to(tl.int64) * PN + offs, mask=m, other=0.)
    ngroups = tl.cdiv(nc, CPG)
    for k in range(ngroups):
        top = nc - 1 - k * CPG
        c = top - rows
        mc = c >= 0
        dec = tl.exp(tl.load(CS_ptr + bh.to(tl.int64) * Lp + c * Q + Q - 1, mask=mc, other=0.))
        ptr = (bh.to(tl.int64) * nc + c)[:, None] * PN + offs[None, :]
        local = tl.load(DS_ptr + ptr, mask=mc[:, None] & m[None, :], other=0.)
        s_start = tl.load(S_ptr + ptr, mask=mc[:, None] & m[None, :], other=0.)
        a, b = tl.associative_scan((tl.broadcast_to(dec[:, None], (CPG, BLOCK)), local), 0, _affine)
        d_start = a * ds[None, :] + b  # row r: the gradient at the start of chunk c = the end of chunk c - 1
        # The top chunk's end gradient is the carry; chunk c - 1's is row r (its state at the end: s_start).
        s_top = tl.load(S_ptr + (bh.to(tl.int64) * nc + top + 1) * PN + offs, mask=m & (top + 1 < nc), other=0.)
        s_top = tl.where(top + 1 < nc, s_top, fin)
        tl.store(DSX_ptr + (bh.to(tl.int64) * nc + top) * PN + offs, ds.to(DSX_ptr.dtype.element_ty), mask=m)
        tl.store(ddec_ptr + top, tl.sum(ds * s_top, axis=0))
        shift = (rows < CPG - 1) & (c >= 1)  # the group's last row is the next group's carry
        tl.store(DSX_ptr + ptr - PN, d_start.to(DSX_ptr.dtype.element_ty), mask=shift[:, None] & m[None, :])
        tl.store(ddec_ptr + c - 1, tl.sum(d_start * s_start, axis=1), mask=shift)
        ds = tl.sum(tl.where(rows[:, None] == CPG - 1, d_start, 0.), axis=0)
    tl.store(DH0_ptr + bh.to(tl.int64) * PN + offs, ds, mask=m)


@triton.jit
def _bwd_tile(L, H, G, P, N, Q: tl.constexpr, BM: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
              HPP: tl.constexpr):
    """What a _bwd_db / _bwd_dc program works on: grid axis 0 is (chunk c, BM-row tile starting at r0 in it),
    axis 1 is (batch b, group g, split of the group's heads into HPP-sized parts). Returns those, the heads per
    group, the p/n offsets and masks, and the tile's positions t, their mask and (b * L + t) rows."""
    blk, pid = tl.program_id(0), tl.program_id(1)
    mpc = Q // BM
    c, r0 = blk // mpc, (blk % mpc) * BM
    hpg = H // G
    nsplit = tl.cdiv(hpg, HPP)
    bg, split = pid // nsplit, pid % nsplit
    b, g = bg // G, bg % G
    offs_p, offs_n = tl.arange(0, BP), tl.arange(0, BN)
    t = c * Q + r0 + tl.arange(0, BM)
    mt = t < L
    return c, r0, b, g, hpg, split, offs_p, offs_n, offs_p < P, offs_n < N, t, mt, (b * L + t).to(tl.int64)


@triton.jit
def _bwd_dx(X_ptr, DY_ptr, DT_ptr, CS_ptr, B_ptr, C_ptr, DS_ptr, D_ptr, DX_ptr, DDT_ptr, DCS_ptr, DD_ptr,
            L, H, G, Lp, nc, P, N, s_slot,
            HAS_D: tl.constexpr, D_HDIM: tl.constexpr,
            Q: tl.constexpr, BM: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr):
    """Key tile j of a chunk, one head: dx_j, ddt_j (direct part) and the key part of d(cs_j) (stored; the
    query part is added by _bwd_dc). One head's accumulators only, so the tile stays in registers."""
    c, j0, b, h, bh, g, offs_p, offs_n, mp, mn, tj, mj, rowj = _head_tile(L, H, G, P, N, Q, BM, BP, BN)
    cbase = bh.to(tl.int64) * Lp
    Bj = tl.load(B_ptr + (rowj * G + g)[:, None] * N + offs_n[None, :], mask=mj[:, None] & mn[None, :], other=0.)
    xoff = (rowj * H + h)[:, None] * P + offs_p[None, :]
    xj = tl.load(X_ptr + xoff, mask=mj[:, None] & mp[None, :], other=0.)
    cs_j = tl.load(CS_ptr + cbase + tj)
    dt_j = tl.load(DT_ptr + cbase + tj)
    acc_dx = tl.zeros((BM, BP), dtype=tl.float32)
    colsum = tl.zeros((BM,), dtype=tl.float32)
    for i0 in range(j0, Q, BM):
        ti = c * Q + i0 + tl.arange(0, BM)
        mi = ti < L
        rowi = (b * L + ti).to(tl.int64)
        Ci = tl.load(C_ptr + (rowi * G + g)[:, None] * N + offs_n[None, :], mask=mi[:, None] & mn[None, :], other=0.)
        dyi = tl.load(DY_ptr + (rowi * H + h)[:, None] * P + offs_p[None, :], mask=mi[:, None] & mp[None, :],
                      other=0.)
        cs_i = tl.load(CS_ptr + cbase + ti)
        causal = (i0 + tl.arange(0, BM))[None, :] >= (j0 + tl.arange(0, BM))[:, None]   # [j, i]: i >= j
        decay = tl.exp(tl.where(causal, cs_i[None, :] - cs_j[:, None], float("-inf")))
        gT = tl.dot(Bj, tl.trans(Ci)) * decay                  # (C_i . B_j) L_ij, as [j, i]
        acc_dx += tl.dot(gT.to(dyi.dtype), dyi)
        colsum += tl.sum(gT * tl.dot(xj, tl.trans(dyi)), axis=1)   # sum_i (C_i . B_j) L_ij (dy_i . x_j)
    # The chunk-end state's part: s_end += exp(cs_end - cs_j) dt_j x_j B_j^T.
    ds = tl.load(DS_ptr + ((bh.to(tl.int64) * nc + c) * P + offs_p[:, None]) * N + offs_n[None, :],
                 mask=mp[:, None] & mn[None, :], other=0.)
    e = tl.exp(tl.load(CS_ptr + cbase + c * Q + Q - 1) - cs_j)
    BdS = tl.dot(Bj, tl.trans(ds.to(Bj.dtype)))                  # (BM, P)
    xdS = tl.dot(xj, ds.to(xj.dtype))                            # (BM, N)
    dx = dt_j[:, None] * (acc_dx + e[:, None] * BdS)
    if HAS_D:
        # D skip: dx += D dy here, and dD = sum(dy * x) reduced in-kernel (one atomic per program).
        dyj = tl.load(DY_ptr + xoff, mask=mj[:, None] & mp[None, :], other=0.).to(tl.float32)
        dD = tl.sum(dyj * xj.to(tl.float32), axis=0)                 # (BP,)
        # s_slot > 0 (deterministic mode): one copy of dD per (key tile, batch row), summed on the host.
        DD_ptr += (tl.program_id(0) * (tl.num_programs(1) // H) + b).to(tl.int64) * s_slot
        if D_HDIM:
            dx += dyj * tl.load(D_ptr + h * P + offs_p, mask=mp, other=0.)[None, :]
            tl.atomic_add(DD_ptr + h * P + offs_p, dD, mask=mp)
        else:
            dx += dyj * tl.load(D_ptr + h)
            tl.atomic_add(DD_ptr + h, tl.sum(dD, axis=0))
    tl.store(DX_ptr + xoff, dx.to(DX_ptr.dtype.element_ty), mask=mj[:, None] & mp[None, :])
    ddt = colsum + e * tl.sum(xdS * Bj.to(tl.float32), axis=1)
    tl.store(DDT_ptr + cbase + tj, ddt)
    tl.store(DCS_ptr + cbase + tj, -dt_j * ddt)


@triton.jit
def _pair_rows(X_ptr, DY_ptr, DT_ptr, CS_ptr, b, h, H, Lp, P, offs_p, mp, ti, mi, rowi, tj, mj, rowj):
    """Head h's values for a (query tile i, key tile j) pair: cs_i, cs_j, dt_j, x_j and dy_i."""
    cbase = (b * H + h).to(tl.int64) * Lp
    xj = tl.load(X_ptr + (rowj * H + h)[:, None] * P + offs_p[None, :], mask=mj[:, None] & mp[None, :], other=0.)
    dyi = tl.load(DY_ptr + (rowi * H + h)[:, None] * P + offs_p[None, :], mask=mi[:, None] & mp[None, :], other=0.)
    return (tl.load(CS_ptr + cbase + ti), tl.load(CS_ptr + cbase + tj), tl.load(DT_ptr + cbase + tj), xj, dyi)


@triton.jit
def _bwd_db(X_ptr, DY_ptr, DT_ptr, CS_ptr, C_ptr, DS_ptr, DB_ptr, L, H, G, Lp, nc, P, N, s_slot,
            Q: tl.constexpr, BM: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, HPP: tl.constexpr):
    """Key tile j of a chunk, HPP heads of group g: dB_j = sum_i M_ji C_i with M = sum over the heads of
    (x_j . dy_i) L_ij dt_j. The heads are summed into M before the product with C (one N-wide matmul per tile
    pair, not one per head); the chunk-end state's part is added per head. Added to DB (fp32 atomics)."""
    c, j0, b, g, hpg, split, offs_p, offs_n, mp, mn, tj, mj, rowj = _bwd_tile(L, H, G, P, N, Q, BM, BP, BN, HPP)
    h_lo, h_hi = g * hpg + split * HPP, g * hpg + tl.minimum(split * HPP + HPP, hpg)
    DB_ptr += split.to(tl.int64) * s_slot   # deterministic mode: each split's own copy of dB
    dB = tl.zeros((BM, BN), dtype=tl.float32)
    for i0 in range(j0, Q, BM):
        ti = c * Q + i0 + tl.arange(0, BM)
        mi = ti < L
        rowi = (b * L + ti).to(tl.int64)
        causal = (i0 + tl.arange(0, BM))[None, :] >= (j0 + tl.arange(0, BM))[:, None]   # [j, i]: i >= j
        M = tl.zeros((BM, BM), dtype=tl.float32)
        for h in range(h_lo, h_hi):
            cs_i, cs_j, dt_j, xj, dyi = _pair_rows(X_ptr, DY_ptr, DT_ptr, CS_ptr, b, h, H, Lp, P, offs_p, mp,
                                                   ti, mi, rowi, tj, mj, rowj)
            w = tl.exp(tl.where(causal, cs_i[None, :] - cs_j[:, None], float("-inf"))) * dt_j[:, None]
            M += tl.dot(xj, tl.trans(dyi)) * w
        Ci = tl.load(C_ptr + (rowi * G + g)[:, None] * N + offs_n[None, :], mask=mi[:, None] & mn[None, :], other=0.)
        dB += tl.dot(M.to(Ci.dtype), Ci)
    for h in range(h_lo, h_hi):
        bh = b * H + h
        cbase = bh.to(tl.int64) * Lp
        cs_j = tl.load(CS_ptr + cbase + tj)
        dt_j = tl.load(DT_ptr + cbase + tj)
        xj = tl.load(X_ptr + (rowj * H + h)[:, None] * P + offs_p[None, :], mask=mj[:, None] & mp[None, :], other=0.)
        ds = tl.load(DS_ptr + ((bh.to(tl.int64) * nc + c) * P + offs_p[:, None]) * N + offs_n[None, :],
                     mask=mp[:, None] & mn[None, :], other=0.)
        e = tl.exp(tl.load(CS_ptr + cbase + c * Q + Q - 1) - cs_j)
        dB += (dt_j * e)[:, None] * tl.dot(xj, ds.to(xj.dtype))
    tl.atomic_add(DB_ptr + (rowj * G + g)[:, None] * N + offs_n[None, :], dB, mask=mj[:, None] & mn[None, :])


@triton.jit
def _bwd_dc(X_ptr, DY_ptr, DT_ptr, CS_ptr, B_ptr, C_ptr, S_ptr, DC_ptr, DCS_ptr, L, H, G, Lp, nc, P, N, s_slot,
            Q: tl.constexpr, BM: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, HPP: tl.constexpr,
            HPP2: tl.constexpr):
    """Query tile i of a chunk, HPP heads of group g: dC_i = sum_j M_ij B_j with M = sum over the heads of
    (dy_i . x_j) L_ij dt_j (summed before the product with B, as in _bwd_db), plus the incoming state's part;
    added to DC. Also the query part of each head's d(cs_i), added to DCS (which _bwd_dx wrote first): it needs
    C_i . B_j, the same for every head, so computed once per tile pair. HPP2: HPP rounded up to a power of 2."""
    c, i0, b, g, hpg, split, offs_p, offs_n, mp, mn, ti, mi, rowi = _bwd_tile(L, H, G, P, N, Q, BM, BP, BN, HPP)
    h_lo, h_hi = g * hpg + split * HPP, g * hpg + tl.minimum(split * HPP + HPP, hpg)
    DC_ptr += split.to(tl.int64) * s_slot   # deterministic mode: each split's own copy of dC
    Ci = tl.load(C_ptr + (rowi * G + g)[:, None] * N + offs_n[None, :], mask=mi[:, None] & mn[None, :], other=0.)
    dC = tl.zeros((BM, BN), dtype=tl.float32)
    slot = tl.arange(0, HPP2)[:, None]
    rowsum = tl.zeros((HPP2, BM), dtype=tl.float32)  # per head: sum_j (dy_i . x_j) L_ij dt_j (C_i . B_j)
    for j0 in range(0, i0 + BM, BM):
        tj = c * Q + j0 + tl.arange(0, BM)
        mj = tj < L
        rowj = (b * L + tj).to(tl.int64)
        Bj = tl.load(B_ptr + (rowj * G + g)[:, None] * N + offs_n[None, :], mask=mj[:, None] & mn[None, :], other=0.)
        cb = tl.dot(Ci, tl.trans(Bj))
        causal = (i0 + tl.arange(0, BM))[:, None] >= (j0 + tl.arange(0, BM))[None, :]
        M = tl.zeros((BM, BM), dtype=tl.float32)
        for h in range(h_lo, h_hi):
            cs_i, cs_j, dt_j, xj, dyi = _pair_rows(X_ptr, DY_ptr, DT_ptr, CS_ptr, b, h, H, Lp, P, offs_p, mp,
                                                   ti, mi, rowi, tj, mj, rowj)
            w = tl.exp(tl.where(causal, cs_i[:, None] - cs_j[None, :], float("-inf"))) * dt_j[None, :]
            mw = tl.dot(dyi, tl.trans(xj)) * w
            M += mw
            rowsum += tl.where(slot == h - h_lo, tl.sum(mw * cb, axis=1)[None, :], 0.)
        dC += tl.dot(M.to(Bj.dtype), Bj)
    for h in range(h_lo, h_hi):
        bh = b * H + h
        cbase = bh.to(tl.int64) * Lp
        cs_i = tl.load(CS_ptr + cbase + ti)
        dyi = tl.load(DY_ptr + (rowi * H + h)[:, None] * P + offs_p[None, :], mask=mi[:, None] & mp[None, :],
                      other=0.)
        st = tl.load(S_ptr + ((bh.to(tl.int64) * nc + c) * P + offs_p[:, None]) * N + offs_n[None, :],
                     mask=mp[:, None] & mn[None, :], other=0.)
        dyS = tl.dot(dyi, st.to(dyi.dtype)) * tl.exp(cs_i)[:, None]   # (BM, N): exp(cs_i) dy_i s_start
        dC += dyS
        rs = tl.sum(tl.where(slot == h - h_lo, rowsum, 0.), axis=0)
        dcs = tl.load(DCS_ptr + cbase + ti)
        tl.store(DCS_ptr + cbase + ti, dcs + rs + tl.sum(dyS * Ci.to(tl.float32), axis=1))
    tl.atomic_add(DC_ptr + (rowi * G + g)[:, None] * N + offs_n[None, :], dC, mask=mi[:, None] & mn[None, :])


@dataclass(frozen=True)
class SSDConfig:
    """Launch configuration of the SSD kernels (the defaults are the H100 measurements below).

    block_m / block_m_bwd: rows per tile within a chunk in the forward / backward (a chunk of Q steps is
    Q / block_m query tiles and as many key tiles). warps_*: warps per program. _bwd_dx and _bwd_db at 4 warps
    (at 8 one program runs per SM: forward+backward 5.68 / 4.95 vs 4.83 ms with dx / db at 8, H100, batch 8,
    L 8192, d_state 128); _bwd_dc, which spilled at 4, at 8 (1.25 vs 1.37 ms for that kernel, 4.80 vs 4.95 ms
    in all).
    state_block: the state passes' P*N elements of a state per program (more programs: more loads in flight
    at batch 1); chunks_per_group: their chunks per group (one memory latency per group of chunks; see
    _state_pass). 512 vs 256, forward+backward at d_state 128, H100, two runs each: 4.77 / 4.74 vs
    4.86 / 4.80 ms at batch 8, L 8192; 1.71 / 2.04 vs 1.86 / 2.11 ms at batch 8, L 2048; 18.88 / 18.88 vs
    18.84 / 18.83 ms at batch 1, L 262144.
    heads_per_program: heads of a group one _bwd_db / _bwd_dc program walks (summing them before the N-wide
    products); the splits of a group add their partial dB / dC with fp32 atomics. Fewer heads per program:
    more programs in flight."""
    block_m: int = 64
    block_m_bwd: int = 64
    warps_fwd: int = 4
    warps_bwd_dx: int = 4
    warps_bwd_db: int = 4
    warps_bwd_dc: int = 8
    state_block: int = 512
    chunks_per_group: int = 16
    heads_per_program: int = 8

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"SSDConfig.{f.name}: expected a positive integer, got {v!r}")
        for name in ("block_m", "block_m_bwd", "state_block", "warps_fwd", "warps_bwd_dx", "warps_bwd_db",
                     "warps_bwd_dc"):
            v = getattr(self, name)
            if v & (v - 1):
                raise ValueError(f"SSDConfig.{name}: expected a power of two, got {v}")


DEFAULT_CONFIG = SSDConfig()


def _blocks(P: int, N: int, Q: int, block_m: int):
    if Q < 16 or Q & (Q - 1):
        raise ValueError(f"chunk_size: the Triton SSD needs a power of two >= 16, got {Q}")
    return max(16, triton.next_power_of_2(P)), max(16, triton.next_power_of_2(N)), min(Q, block_m)


def _forward(x, dt, A, B, C, D, z, dt_bias, h0, Q, softplus, cfg: SSDConfig):
    b, L, H, P = x.shape
    G, N = B.shape[2:]
    BP, BN, BM = _blocks(P, N, Q, cfg.block_m)
    nc = triton.cdiv(L, Q)
    Lp = nc * Q
    dev = x.device
    DT = torch.empty(b, H, Lp, device=dev, dtype=torch.float32)
    CS = torch.empty_like(DT)
    _dt_cumsum[(nc, b * H)](dt, dt_bias, A, DT, CS, L, H, Lp, HAS_BIAS=dt_bias is not None, SOFTPLUS=softplus, Q=Q)
    S = torch.empty(b, H, nc, P, N, device=dev, dtype=torch.float32)
    BNo = min(BN, 64)
    _chunk_outer[(b * nc * H * triton.cdiv(N, BNo),)](x, B, DT, CS, S, L, H, G, Lp, nc, P, N, MODE=0, Q=Q,
                                                      BK=BM, BP=BP, BN=BNo, num_warps=cfg.warps_fwd)
    final = torch.empty(b, H, P, N, device=dev, dtype=torch.float32)
    PN = P * N
    SB = min(cfg.state_block, triton.next_power_of_2(PN))
    Sx = S if x.dtype == torch.float32 else torch.empty(S.shape, device=dev, dtype=x.dtype)
    _state_pass[(b * H, triton.cdiv(PN, SB))](S, Sx, CS, h0, final, Lp, nc, PN, Q=Q, HAS_H0=h0 is not None, BLOCK=SB,
                                              CPG=cfg.chunks_per_group)
    y = torch.empty_like(x)
    y_pre = torch.empty_like(x) if z is not None else None
    _chunk_scan[(nc * (Q // BM), b * H)](x, DT, CS, B, C, Sx, D, z, y, y_pre, L, H, G, Lp, nc, P, N,
                                         HAS_D=D is not None, D_HDIM=D is not None and D.dim() == 2,
                                         HAS_Z=z is not None, Q=Q, BM=BM, BP=BP, BN=BN,
                                         num_warps=cfg.warps_fwd)
    return y, final, y_pre, DT, CS, S, Sx


def _backward(dy, dfinal, x, dt, A, B, C, D, z, dt_bias, h0, Q, softplus, y_pre, DT, CS, S, Sx, final,
              cfg: SSDConfig):
    b, L, H, P = x.shape
    G, N = B.shape[2:]
    BP, BN, BM = _blocks(P, N, Q, cfg.block_m)
    nc, Lp = CS.shape[-1] // Q, CS.shape[-1]
    dz = None
    if z is not None:
        zf, sig = z.float(), torch.sigmoid(z.float())
        dz = (dy.float() * y_pre.float() * sig * (1 + zf * (1 - sig))).to(z.dtype)
        dy = (dy.float() * zf * sig).to(x.dtype)
    dy = dy.contiguous()
    hpp = min(cfg.heads_per_program, H // G)
    BM = min(Q, cfg.block_m_bwd)
    # Copies of dD (added by _bwd_dx: one per key tile and batch row) and of dB / dC (by _bwd_db / _bwd_dc:
    # one per split of a group's heads): one, by fp32 atomics, unless deterministic (partial_slots).
    dd_slots, split_slots = partial_slots(nc * (Q // BM) * b), partial_slots(triton.cdiv(H // G, hpp))
    dD = torch.zeros(dd_slots, *D.shape, device=x.device, dtype=torch.float32) if D is not None else None
    DS = torch.empty(b, H, nc, P, N, device=x.device, dtype=torch.float32)
    BNo = min(BN, 64)
    _chunk_outer[(b * nc * H * triton.cdiv(N, BNo),)](dy, C, DT, CS, DS, L, H, G, Lp, nc, P, N, MODE=1, Q=Q,
                                                      BK=BM, BP=BP, BN=BNo, num_warps=cfg.warps_fwd)
    PN = P * N
    SB = min(cfg.state_block, triton.next_power_of_2(PN))
    nsb = triton.cdiv(PN, SB)
    dh0 = torch.empty(b, H, P, N, device=x.device, dtype=torch.float32)
    ddec = torch.empty(b, H, nsb, nc, device=x.device, dtype=torch.float32)  # per state block, summed below
    DSx = DS if x.dtype == torch.float32 else torch.empty(DS.shape, device=x.device, dtype=x.dtype)
    _dstate_pass[(b * H, nsb)](DS, DSx, S, final, CS, dfinal, dh0, ddec, Lp, nc, PN, Q=Q, HAS_DFIN=dfinal is not None,
                               BLOCK=SB, CPG=cfg.chunks_per_group)
    ddec = ddec.sum(2)
    dx = torch.empty_like(x)
    dB = torch.zeros(split_slots, *B.shape, device=x.device, dtype=torch.float32)
    dC = torch.zeros(split_slots, *C.shape, device=x.device, dtype=torch.float32)
    DDT = torch.empty_like(DT)
    DCS = torch.empty_like(DT)
    del DS
    _bwd_dx[(nc * (Q // BM), b * H)](x, dy, DT, CS, B, C, DSx, D, dx, DDT, DCS, dD, L, H, G, Lp, nc, P, N,
                                     D.numel() if D is not None and dd_slots > 1 else 0,
                                     HAS_D=D is not None, D_HDIM=D is not None and D.dim() == 2, Q=Q, BM=BM, BP=BP,
                                     BN=BN, num_warps=cfg.warps_bwd_dx)
    grid = (nc * (Q // BM), b * G * triton.cdiv(H // G, hpp))
    s_split = B.numel() if split_slots > 1 else 0
    _bwd_db[grid](x, dy, DT, CS, C, DSx, dB, L, H, G, Lp, nc, P, N, s_split, Q=Q, BM=BM, BP=BP, BN=BN, HPP=hpp,
                  num_warps=cfg.warps_bwd_db)
    _bwd_dc[grid](x, dy, DT, CS, B, C, Sx, dC, DCS, L, H, G, Lp, nc, P, N, s_split, Q=Q, BM=BM, BP=BP, BN=BN, HPP=hpp,
                  HPP2=triton.next_power_of_2(hpp), num_warps=cfg.warps_bwd_dc)
    # d(cs) -> d(dt * A): cs is a cumsum within each chunk, so its adjoint is the reverse cumsum.
    dcs = DCS.view(b, H, nc, Q)
    dcs[..., -1] += ddec
    ddA = dcs.flip(-1).cumsum(-1).flip(-1).reshape(b, H, Lp)
    Af = A.float()
    ddt = DDT + ddA * Af[None, :, None]
    dA = (ddA * DT).sum(dim=(0, 2)).to(A.dtype)
    ddt = ddt[..., :L]
    if softplus or dt_bias is not None:
        raw = dt.float().permute(0, 2, 1)
        if dt_bias is not None:
            raw = raw + dt_bias.float()[None, :, None]
        if softplus:
            ddt = ddt * torch.sigmoid(raw)
    ddt_bias = ddt.sum(dim=(0, 2)).to(dt_bias.dtype) if dt_bias is not None else None
    ddt = ddt.permute(0, 2, 1).to(dt.dtype)
    dD = slots_sum(dD).to(D.dtype) if D is not None else None
    dB, dC = slots_sum(dB).to(B.dtype), slots_sum(dC).to(C.dtype)
    return dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dh0 if h0 is not None else None


class _SSDFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, z, dt_bias, h0, Q, softplus, cfg):
        y, final, y_pre, DT, CS, S, Sx = _forward(x, dt, A, B, C, D, z, dt_bias, h0, Q, softplus, cfg)
        ctx.save_for_backward(x, dt, A, B, C, D, z, dt_bias, h0, y_pre, DT, CS, S, Sx, final)
        ctx.Q, ctx.softplus, ctx.cfg = Q, softplus, cfg
        return y, final

    @staticmethod
    def backward(ctx, dy, dfinal):
        x, dt, A, B, C, D, z, dt_bias, h0, y_pre, DT, CS, S, Sx, final = ctx.saved_tensors
        grads = _backward(dy, dfinal, x, dt, A, B, C, D, z, dt_bias, h0, ctx.Q, ctx.softplus, y_pre, DT, CS, S,
                          Sx, final, ctx.cfg)
        return (*grads, None, None, None)


def _check(x, dt, A, B, C, D, z, dt_bias, h0) -> None:
    """Cheap structural checks; the reference (ssm_core.reference.check_ssd_inputs) words them per argument."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] < 1:
        raise ValueError("x: expected a tensor of shape (batch, L >= 1, nheads, headdim)")
    b, L, H, P = x.shape
    if not isinstance(B, torch.Tensor) or B.dim() != 4 or B.shape[:2] != (b, L) or H % B.shape[2]:
        raise ValueError(f"B: expected shape (batch={b}, L={L}, ngroups, d_state) with ngroups dividing nheads={H}")
    G, N = B.shape[2:]
    d_shape = (H, P) if D is not None and D.dim() == 2 else (H,)
    want = {"dt": (dt, (b, L, H)), "A": (A, (H,)), "C": (C, (b, L, G, N)), "z": (z, (b, L, H, P)),
            "dt_bias": (dt_bias, (H,)), "initial_states": (h0, (b, H, P, N)), "D": (D, d_shape)}
    for name, (t, shape) in want.items():
        if (t is None and name in ("dt", "A", "C")) or (t is not None and tuple(t.shape) != shape):
            raise ValueError(f"{name}: expected shape {shape}, got {None if t is None else tuple(t.shape)}")


def ssd_chunk_scan(x, dt, A, B, C, chunk_size: int = 256, D=None, z=None, dt_bias=None, dt_softplus: bool = False,
                   initial_states=None, return_final_states: bool = False, config: SSDConfig | None = None):
    """Triton chunked SSD: `ssm_core.reference.ssd_chunk_scan_ref` semantics. chunk_size: a power of two >= 16.
    `config`: tiles and warps (default DEFAULT_CONFIG); the result does not depend on it."""
    _check(x, dt, A, B, C, D, z, dt_bias, initial_states)
    cfg = config or DEFAULT_CONFIG
    _blocks(1, 1, int(chunk_size), cfg.block_m)  # validates chunk_size
    cont = lambda t: t.contiguous() if t is not None else None  # noqa: E731
    h0 = initial_states.float().contiguous() if initial_states is not None else None
    # The result does not depend on the chunk size: short inputs (streaming chunks) get a smaller one.
    Q = min(int(chunk_size), max(16, triton.next_power_of_2(x.shape[1])))
    y, final = _SSDFn.apply(cont(x), cont(dt), cont(A.float()), cont(B), cont(C),
                            cont(D.float()) if D is not None else None, cont(z),
                            cont(dt_bias.float()) if dt_bias is not None else None, h0, Q,
                            bool(dt_softplus), cfg)
    return (y, final) if return_final_states else y
