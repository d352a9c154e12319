"""Fused Triton selective scan (Mamba-1), forward and backward.

Layout. A program is one warp; it owns one batch row and BLOCK_D channels. LANES = 32 / BLOCK_D lanes share
a channel, each holding SPT = N / LANES of its states in registers (by default 8: 2 lanes per channel at
N = 16, 8 at N = 64). Every tile is 3-D with the same pattern, (LANES, registers, BLOCK_D), so Triton gives
them all one layout: states (LANES, SPT, BLOCK_D), and a chunk of BLOCK_T steps of u, delta, z as
(LANES, BLOCK_T, BLOCK_D), loaded replicated in the lanes of a channel (one 16-byte load per lane in bf16).
The chunk is unrolled step by step:
    a = exp(dt A),  h = a h + dt u B,  y = sum_n h C
so the time recurrence is one FMA chain per state, a step's row of a time tile is a register pick, the N
contraction stays in the thread but for one butterfly over the LANES lanes of a channel, and softplus and
the silu(z) gate run once per (step, channel) and lane. B and C are read through (L, N)-major copies (a
step's states of a lane: one 16-byte load), a whole chunk of them, like u, delta and z, one chunk ahead
of its use: with one warp per program only one or two warps share a scheduler, and a load issued where
its step needs it leaves the warp waiting a full memory latency. The (batch, dim, L, N) state never
reaches global memory: the forward saves the state every ckpt_chunks * BLOCK_T steps, in (N, dim) layout.

Backward. Walks the checkpoint spans in reverse: re-runs the forward over a span to park each chunk's
start state in a per-program scratch (L2 resident), then walks the span's chunks backwards: recomputes
h_t for the chunk (kept in registers), and runs the adjoint g_t = C_t dy_t + a_{t+1} g_{t+1} step by step,
accumulating du, ddelta, dz, dA, dD, d(delta_bias) in the thread; dB and dC are sums over channels
(a butterfly over the lanes, then fp32 atomics across programs; under torch.use_deterministic_algorithms
each program's sums go to its own copy, added in a fixed order: bit-identical re-runs).

Long sequences at small batch. B * dim / BLOCK_D programs cannot fill the GPU at batch 1, so the
sequence is cut into segments run in parallel: a summary pass gives each segment's end state from zero
and its sum of dt; a short sequential pass over the segments carries the states, h_in(s+1) =
exp(A sum dt(s)) h_in(s) + h_loc(s); then every segment runs from its true start state. The backward
does the same with the adjoint, whose carry over a segment is also exp(A sum dt).
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import _row, _softplus, group_strides, partial_slots, slots_sum

LOG2E = 1.4426950408889634
# The CPU interpreter runs no PTX: there the lane exchange of _add_channel_sums is a tl.gather (which on the GPU
# moves the tiles to another layout and back: three shuffles for one).
_INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


@triton.jit
def _put_row(x, offs_t, i, v):
    return tl.where((offs_t == i)[None, :, None], v, x)


@triton.jit
def _nsum(x):
    """Sum over the states of a (LANES, SPT, BLOCK_D) tile: in the thread, then over the lanes that share a
    channel. (1, 1, BLOCK_D)."""
    return tl.sum(tl.sum(x, axis=1), axis=0)[None, None, :]


@triton.jit
def _program(DIM, N, CH_PER_GROUP, s_sn, seg_base, BLOCK_D: tl.constexpr, LANES: tl.constexpr,
             SPT: tl.constexpr, BLOCK_T: tl.constexpr):
    """This program's batch, segment, channels, states, the (N, dim) state offsets and its B/C group.

    Tiles are 3-D with one shape pattern, so Triton gives them one layout: (LANES, registers, BLOCK_D).
    States: (LANES, SPT, BLOCK_D), lane l of a channel holding states l*SPT .. l*SPT + SPT - 1. Time tiles:
    (LANES, BLOCK_T, BLOCK_D), the same steps in every lane of a channel (loaded replicated), so picking a
    step's row is a register move whatever N is. s_sn (= dim) is passed unspecialised: Triton then cannot
    vectorise state loads along channels, which would put states on the lanes."""
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    seg = tl.program_id(2) + seg_base
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d3 = offs_d.to(tl.int64)[None, None, :]
    md3 = (offs_d < DIM)[None, None, :]
    lane = tl.arange(0, LANES)[:, None, None]
    n3 = lane * SPT + tl.arange(0, SPT)[None, :, None]
    st = n3.to(tl.int64) * s_sn + d3
    mst = (n3 < N) & md3
    grp = (pid_d * BLOCK_D) // CH_PER_GROUP  # BLOCK_D divides CH_PER_GROUP when grouped
    return pid_b, seg, d3, md3, lane, n3, tl.arange(0, BLOCK_T), st, mst, grp


@triton.jit
def _channel_vector(x_ptr, d3, md3, BLOCK_D: tl.constexpr, PRESENT: tl.constexpr):
    """delta_bias or D for this program's channels in fp32, (1, 1, BLOCK_D); zeros when absent."""
    if PRESENT:
        return tl.load(x_ptr + d3, mask=md3, other=0.).to(tl.float32)
    return tl.zeros([1, 1, BLOCK_D], tl.float32)


@triton.jit
def _state_or_zeros(x_ptr, off, mst, PRESENT: tl.constexpr, LANES: tl.constexpr, SPT: tl.constexpr,
                    BLOCK_D: tl.constexpr):
    """A (LANES, SPT, BLOCK_D) fp32 state tile read at `off`, or zeros when the input is absent."""
    if PRESENT:
        return tl.load(x_ptr + off, mask=mst, other=0.)
    return tl.zeros([LANES, SPT, BLOCK_D], tl.float32)


@triton.jit
def _row_pointers(u_ptr, dl_ptr, z_ptr, B_ptr, C_ptr, pid_b, grp, s_ub, s_db, s_zb, s_bb, s_bg, s_cb, s_cg):
    """u, delta, z, B, C moved to this program's batch row (and B/C group)."""
    return (u_ptr + pid_b * s_ub, dl_ptr + pid_b * s_db, z_ptr + pid_b * s_zb,
            B_ptr + pid_b * s_bb + grp * s_bg, C_ptr + pid_b * s_cb + grp * s_cg)


@triton.jit
def _steps(c, offs_t, L, md3, BLOCK_T: tl.constexpr):
    """Positions (1, BLOCK_T, 1) of chunk c and the (1, BLOCK_T, BLOCK_D) mask of real steps and channels."""
    t3 = c * BLOCK_T + offs_t[None, :, None]
    return t3, (t3 >= 0) & (t3 < L) & md3


@triton.jit
def _tile(x_ptr, t3, m3, d3, lane, s_d, s_l):
    """A (LANES, BLOCK_T, BLOCK_D) tile of a (dim, L) row in its own dtype (masked entries 0), the same
    values in every lane of a channel."""
    return tl.load(x_ptr + d3 * s_d + t3 * s_l + lane * 0, mask=m3, other=0.)


@triton.jit
def _put_tile(x_ptr, x, t3, m3, d3, lane, s_d, s_l):
    """Store a tile: one lane per channel writes it."""
    tl.store(x_ptr + d3 * s_d + t3 * s_l + lane * 0, x.to(x_ptr.dtype.element_ty), mask=m3 & (lane == 0))


@triton.jit
def _delta(dl_raw, bias, m3, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    dr = dl_raw.to(tl.float32)
    if HAS_BIAS:
        dr += bias
    if SOFTPLUS:
        dt = _softplus(dr)
    else:
        dt = dr
    return dr, tl.where(m3, dt, 0.)


@triton.jit
def _column(X_ptr, n3, d3, N, ti, L, s_xn, s_xl):
    """B[:, ti] or C[:, ti] as a (LANES, SPT, BLOCK_D) tile in its own dtype, the same column for every channel:
    lanes that hold the same states read the same addresses (an L1 broadcast). Loaded at the state tile's full
    shape so that Triton gives it the state tile's layout (a (LANES, SPT, 1) load would spread the states over
    lanes)."""
    return tl.load(X_ptr + n3.to(tl.int64) * s_xn + ti * s_xl + d3 * 0, mask=(n3 < N) & (ti < L), other=0.)


@triton.jit
def _step_in(X_ptr, n3, d3, N, ti, L, s_xn, s_xl):
    """_column in fp32, loaded where it is used."""
    return _column(X_ptr, n3, d3, N, ti, L, s_xn, s_xl).to(tl.float32)


@triton.jit
def _bc_chunk(X_ptr, c, n3, d3, N, L, s_xn, s_xl, BLOCK_T: tl.constexpr):
    """B or C of chunk c (>= 0) as a tuple of BLOCK_T step columns (raw dtype). Loaded a chunk ahead: with B, C
    (L, N)-major every step's column is a new 32-byte sector, an L2 round trip if loaded where it is used."""
    cols = ()
    for i in tl.static_range(BLOCK_T):
        cols = cols + (_column(X_ptr, n3, d3, N, c * BLOCK_T + i, L, s_xn, s_xl),)
    return cols


@triton.jit
def _chunk_ahead(c, rows, cols, offs_t, L, d3, md3, lane, n3, N, BLOCK_T: tl.constexpr, LOAD_ROWS: tl.constexpr,
                 LOAD_COLS: tl.constexpr):
    """Chunk c's inputs as one flat tuple: the time tile (_tile) of each (pointer, dim stride, L stride) in
    `rows`, then the step columns (_bc_chunk) of each (pointer, N stride, L stride) B or C in `cols`. Only the
    first LOAD_ROWS rows and LOAD_COLS columns are loaded (the others are inputs the kernel is compiled
    without): in their place the first tile (or B/C) stands in, never read, so the loop-carried tuple keeps
    one shape. Every kernel loads a chunk's inputs one chunk ahead of their use: with one or two warps per
    scheduler, a load issued when its chunk starts leaves the warp idle for a whole memory latency."""
    t3, m3 = _steps(c, offs_t, L, md3, BLOCK_T)
    tiles = ()
    for k in tl.static_range(len(rows)):
        if k < LOAD_ROWS:
            tiles = tiles + (_tile(rows[k][0], t3, m3, d3, lane, rows[k][1], rows[k][2]),)
        else:
            tiles = tiles + (tiles[0],)
    columns = ()
    for k in tl.static_range(len(cols)):
        if k < LOAD_COLS:
            columns = columns + (_bc_chunk(cols[k][0], c, n3, d3, N, L, cols[k][1], cols[k][2], BLOCK_T),)
        else:
            columns = columns + (columns[0],)
    return tiles + columns


@triton.jit
def _from_partner(x, dl, m):
    """x as held by the lanes of channel dl ^ m: a butterfly shuffle with lane mask = the first lane whose channel
    has bit m (the count of trailing zeros of a ballot), whatever order Triton gave the lanes; the host makes
    sure the channels are on lanes (_lane_exchange)."""
    if _INTERPRET:
        return tl.gather(x, dl ^ m, axis=2)
    return tl.inline_asm_elementwise(
        """{
        .reg .pred p;
        .reg .b32 b, k;
        and.b32 k, $2, $3;
        setp.ne.b32 p, k, 0;
        vote.sync.ballot.b32 b, p, -1;
        brev.b32 b, b;
        clz.b32 k, b;
        shfl.sync.bfly.b32 $0, $1, k, 0x1f, -1;
        }""", "=r,r,r,r", [x, dl, dl * 0 + m], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _exchange(vals, hi, dl, m, HALF: tl.constexpr):
    """One level of a reduce-scatter over the channel lanes: lanes with `hi` (channel bit m set) keep the upper
    HALF of `vals`, the others the lower, each adding its partner's copy. HALF = 0: one value left, a plain
    butterfly (both keep the sum)."""
    kept = ()
    if HALF == 0:
        kept = (vals[0] + _from_partner(vals[0], dl, m),)
    for j in tl.static_range(HALF):
        send = tl.where(hi, vals[j], vals[j + HALF])
        kept = kept + (tl.where(hi, vals[j + HALF], vals[j]) + _from_partner(send, dl, m),)
    return kept


@triton.jit
def _add_channel_sums(dC_ptr, dB_ptr, xc, xb, lane, ti, N, L, SPT: tl.constexpr, BLOCK_D: tl.constexpr,
                      LANE_EXCHANGE: tl.constexpr):
    """dC[n, ti] += sum over channels of xc[n] and dB[n, ti] += that of xb[n], for (LANES, SPT, BLOCK_D) tiles.

    LANE_EXCHANGE: a reduce-scatter over the BLOCK_D lanes of the channels: at each exchange a lane keeps half
    of its values, adds its partner's copy of them, and sends the other half, so the 2 * SPT sums cost
    2 * SPT - 1 shuffles (a butterfly per value: 2 * SPT * log2(BLOCK_D), 64 a step at N = 16, the backward's
    largest cost) and every lane ends with different sums: one atomic per lane. It needs each lane to hold one
    channel, which the host checks in the compiled layout (_lane_exchange).
    Otherwise a butterfly per value, then one atomic per state. (Per-lane atomics of unreduced values to one
    address measured 2.3x slower on an H100.)"""
    if not LANE_EXCHANGE:
        tn = lane * SPT + tl.arange(0, SPT)[None, :, None]
        off = tn.to(tl.int64) * L + ti
        mn = (tn < N) & (ti < L)
        tl.atomic_add(dC_ptr + off, tl.sum(xc, axis=2, keep_dims=True), mask=mn, sem="relaxed")
        tl.atomic_add(dB_ptr + off, tl.sum(xb, axis=2, keep_dims=True), mask=mn, sem="relaxed")
    else:
        s = tl.arange(0, SPT)[None, :, None]
        dl = tl.arange(0, BLOCK_D)[None, None, :] + lane * 0
        vals = ()
        for j in tl.static_range(SPT):
            vals = vals + (tl.sum(tl.where(s == j, xc, 0.), axis=1)[:, None, :],)
        for j in tl.static_range(SPT):
            vals = vals + (tl.sum(tl.where(s == j, xb, 0.), axis=1)[:, None, :],)
        first = dl * 0       # index in `vals` of this lane's first kept value
        for lev in tl.static_range(BLOCK_D.bit_length() - 1):
            hi = (dl & (BLOCK_D >> (lev + 1))) != 0      # the channel bit exchanged at this level
            vals = _exchange(vals, hi, dl, BLOCK_D >> (lev + 1), ((2 * SPT) >> lev) // 2)
            first += tl.where(hi, ((2 * SPT) >> lev) // 2, 0)
        owner = (dl & (BLOCK_D // (2 * SPT) - 1 if BLOCK_D > 2 * SPT else 0)) == 0
        for r in tl.static_range(2 * SPT // BLOCK_D if BLOCK_D < 2 * SPT else 1):
            j = first + r
            n = lane * SPT + j % SPT
            off = n.to(tl.int64) * L + ti
            tl.atomic_add(tl.where(j < SPT, dC_ptr + off, dB_ptr + off), vals[r],
                          mask=owner & (n < N) & (ti < L), sem="relaxed")


@triton.jit
def _decay(dt_i, A2, reset_ptr, ti, L, HAS_RESET: tl.constexpr):
    a = tl.exp2(dt_i * A2)
    if HAS_RESET:  # packed sequences: a step that starts a sequence forgets the state before it
        a = tl.where(tl.load(reset_ptr + ti, mask=ti < L, other=0) != 0, 0., a)
    return a


@triton.jit
def _per_channel_store(x_ptr, x, d3, md3, lane):
    """Store a (LANES, 1, BLOCK_D) per-channel value (the same in every lane of a channel) once."""
    tl.store(x_ptr + d3 + lane * 0, x, mask=md3 & (lane == 0))


@triton.jit(do_not_specialize=["s_sn"])
def _scan_fwd_kernel(
        u_ptr, dl_ptr, A2_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, reset_ptr, hin_ptr, y_ptr, hout_ptr,
        ck_ptr, dts_ptr,
        L, DIM, N, CH_PER_GROUP, n_chunks, seg_chunks, n_seg, seg_base, n_ckpt, s_sn,
        s_ub, s_ud, s_ul, s_db, s_dd, s_dl, s_zb, s_zd, s_zl,
        s_bb, s_bg, s_bn, s_bl, s_cb, s_cg, s_cn, s_cl, s_ob, s_od, s_ol,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
        HAS_RESET: tl.constexpr, HAS_H0: tl.constexpr, SUMMARY: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, LANES: tl.constexpr, SPT: tl.constexpr,
        CKPT_CHUNKS: tl.constexpr):
    """One segment of seg_chunks chunks per program (grid axis 2): y, the checkpoints, the segment's end
    state and its sum of dt. SUMMARY: only the end state from zero and the sum of dt (for the carry pass)."""
    pid_b, seg, d3, md3, lane, n3, offs_t, st, mst, grp = _program(
        DIM, N, CH_PER_GROUP, s_sn, seg_base, BLOCK_D, LANES, SPT, BLOCK_T)
    u_ptr, dl_ptr, z_ptr, B_ptr, C_ptr = _row_pointers(u_ptr, dl_ptr, z_ptr, B_ptr, C_ptr, pid_b, grp,
                                                        s_ub, s_db, s_zb, s_bb, s_bg, s_cb, s_cg)
    y_ptr += pid_b * s_ob
    slot = (pid_b * n_seg + seg) * N * DIM
    A2 = tl.load(A2_ptr + st, mask=mst, other=0.)
    bias = _channel_vector(bias_ptr, d3, md3, BLOCK_D, HAS_BIAS)
    Dv = _channel_vector(D_ptr, d3, md3, BLOCK_D, HAS_D)
    h = _state_or_zeros(hin_ptr, slot + st, mst, HAS_H0, LANES, SPT, BLOCK_D)
    dts = tl.zeros([LANES, 1, BLOCK_D], tl.float32)
    GATE: tl.constexpr = HAS_Z and not SUMMARY
    c0 = seg * seg_chunks
    rows = ((u_ptr, s_ud, s_ul), (dl_ptr, s_dd, s_dl), (z_ptr, s_zd, s_zl))
    cols = ((B_ptr, s_bn, s_bl), (C_ptr, s_cn, s_cl))
    N_ROWS: tl.constexpr = 3 if GATE else 2
    N_COLS: tl.constexpr = 1 if SUMMARY else 2
    nx = _chunk_ahead(c0, rows, cols, offs_t, L, d3, md3, lane, n3, N, BLOCK_T, N_ROWS, N_COLS)
    for c in range(c0, tl.minimum(c0 + seg_chunks, n_chunks)):
        if not SUMMARY:
            if c % CKPT_CHUNKS == 0:
                tl.store(ck_ptr + (pid_b * n_ckpt + c // CKPT_CHUNKS) * N * DIM + st, h, mask=mst)
        t3, m3 = _steps(c, offs_t, L, md3, BLOCK_T)
        u_raw, dl_raw, z_raw, B_c, C_c = nx
        nx = _chunk_ahead(c + 1, rows, cols, offs_t, L, d3, md3, lane, n3, N, BLOCK_T, N_ROWS, N_COLS)
        u = u_raw.to(tl.float32)
        _, dt = _delta(dl_raw, bias, m3, HAS_BIAS, SOFTPLUS)
        dtu = dt * u
        dts += tl.sum(dt, axis=1)[:, None, :]
        y = tl.zeros([LANES, BLOCK_T, BLOCK_D], tl.float32)
        for i in tl.static_range(BLOCK_T):
            ti = c * BLOCK_T + i
            a = _decay(_row(dt, offs_t, i), A2, reset_ptr, ti, L, HAS_RESET)
            h = a * h + _row(dtu, offs_t, i) * B_c[i].to(tl.float32)
            if not SUMMARY:
                y = _put_row(y, offs_t, i, _nsum(h * C_c[i].to(tl.float32)))
        if not SUMMARY:
            if HAS_D:
                y += Dv * u
            if HAS_Z:
                zt = z_raw.to(tl.float32)
                y = y * zt * tl.sigmoid(zt)
            _put_tile(y_ptr, y, t3, m3, d3, lane, s_od, s_ol)
    tl.store(hout_ptr + slot + st, h, mask=mst)
    _per_channel_store(dts_ptr + (pid_b * n_seg + seg) * DIM, dts, d3, md3, lane)


@triton.jit(do_not_specialize=["s_sn"])
def _segment_carry_kernel(loc_ptr, dts_ptr, A2_ptr, first_ptr, out_ptr, DIM, N, n_seg, s_sn,
                          HAS_FIRST: tl.constexpr, REVERSE: tl.constexpr,
                          BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """The sequential pass over the S segments. Forward: out[0] = first, out[s+1] = exp(A dts[s]) out[s] +
    loc[s] for s < S-1. Reverse (adjoint): out[S-1] = first, out[s-1] = exp(A dts[s]) out[s] + loc[s], s >= 1."""
    pid_b, _, d3, md3, _, _, _, st, mst, _ = _program(DIM, N, DIM, s_sn, 0, BLOCK_D, 1, BLOCK_N, 1)
    A2 = tl.load(A2_ptr + st, mask=mst, other=0.)
    h = _state_or_zeros(first_ptr, pid_b * N * DIM + st, mst, HAS_FIRST, 1, BLOCK_N, BLOCK_D)
    tl.store(out_ptr + (pid_b * n_seg + (n_seg - 1 if REVERSE else 0)) * N * DIM + st, h, mask=mst)
    for k in range(n_seg - 1):
        s = n_seg - 1 - k if REVERSE else k
        dts = tl.load(dts_ptr + (pid_b * n_seg + s) * DIM + d3, mask=md3, other=0.)
        loc = tl.load(loc_ptr + (pid_b * n_seg + s) * N * DIM + st, mask=mst, other=0.)
        h = tl.exp2(dts * A2) * h + loc
        tl.store(out_ptr + (pid_b * n_seg + (s - 1 if REVERSE else s + 1)) * N * DIM + st, h, mask=mst)


@triton.jit(do_not_specialize=["s_sn"])
def _adjoint_summary_kernel(
        dl_ptr, A2_ptr, C_ptr, z_ptr, bias_ptr, reset_ptr, dy_ptr, kout_ptr,
        L, DIM, N, CH_PER_GROUP, n_chunks, seg_chunks, n_seg, seg_base, s_sn,
        s_db, s_dd, s_dl, s_zb, s_zd, s_zl, s_cb, s_cg, s_cn, s_cl, s_ob, s_od, s_ol,
        HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_RESET: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, LANES: tl.constexpr, SPT: tl.constexpr):
    """Each segment's adjoint carry-out a_first * g_first with nothing flowing in from its right: the
    reverse recurrence g_t = C_t dy_t + a_{t+1} g_{t+1} needs no forward state."""
    pid_b, seg, d3, md3, lane, n3, offs_t, st, mst, grp = _program(
        DIM, N, CH_PER_GROUP, s_sn, seg_base, BLOCK_D, LANES, SPT, BLOCK_T)
    dl_ptr += pid_b * s_db
    z_ptr += pid_b * s_zb
    C_ptr += pid_b * s_cb + grp * s_cg
    dy_ptr += pid_b * s_ob
    A2 = tl.load(A2_ptr + st, mask=mst, other=0.)
    bias = _channel_vector(bias_ptr, d3, md3, BLOCK_D, HAS_BIAS)
    K = tl.zeros([LANES, SPT, BLOCK_D], tl.float32)
    c0 = seg * seg_chunks
    c1 = tl.minimum(c0 + seg_chunks, n_chunks)
    rows = ((dl_ptr, s_dd, s_dl), (dy_ptr, s_od, s_ol), (z_ptr, s_zd, s_zl))
    cols = ((C_ptr, s_cn, s_cl),)
    N_ROWS: tl.constexpr = 3 if HAS_Z else 2
    nx = _chunk_ahead(c1 - 1, rows, cols, offs_t, L, d3, md3, lane, n3, N, BLOCK_T, N_ROWS, 1)
    for cr in range(c1 - c0):
        c = c1 - 1 - cr
        t3, m3 = _steps(c, offs_t, L, md3, BLOCK_T)
        dl_raw, dy_raw, z_raw, C_c = nx
        # c >= 1 here (segments 1..S-1), so chunk c - 1 exists.
        nx = _chunk_ahead(c - 1, rows, cols, offs_t, L, d3, md3, lane, n3, N, BLOCK_T, N_ROWS, 1)
        _, dt = _delta(dl_raw, bias, m3, HAS_BIAS, SOFTPLUS)
        dy = dy_raw.to(tl.float32)
        if HAS_Z:
            zt = z_raw.to(tl.float32)
            dy = dy * zt * tl.sigmoid(zt)
        for ir in tl.static_range(BLOCK_T):
            ti = c * BLOCK_T + BLOCK_T - 1 - ir
            g = K + C_c[BLOCK_T - 1 - ir].to(tl.float32) * _row(dy, offs_t, BLOCK_T - 1 - ir)
            K = _decay(_row(dt, offs_t, BLOCK_T - 1 - ir), A2, reset_ptr, ti, L, HAS_RESET) * g
    tl.store(kout_ptr + (pid_b * n_seg + seg) * N * DIM + st, K, mask=mst)


@triton.jit(do_not_specialize=["s_sn", "s_scr"])
def _scan_bwd_kernel(
        u_ptr, dl_ptr, A2_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, reset_ptr, ck_ptr, dy_ptr, kin_ptr,
        scr_ptr, du_ptr, ddl_ptr, dz_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dbias_ptr, kout_ptr,
        L, DIM, N, G, CH_PER_GROUP, n_chunks, seg_chunks, n_seg, seg_base, n_ckpt, s_sn, s_scr, s_slot,
        s_ub, s_ud, s_ul, s_db, s_dd, s_dl, s_zb, s_zd, s_zl,
        s_bb, s_bg, s_bn, s_bl, s_cb, s_cg, s_cn, s_cl, s_ob, s_od, s_ol,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
        HAS_RESET: tl.constexpr, HAS_KIN: tl.constexpr, LANE_EXCHANGE: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, LANES: tl.constexpr, SPT: tl.constexpr,
        SPAN_CHUNKS: tl.constexpr):
    """One segment per program (grid axis 2), its chunks in reverse. K is the adjoint flowing into the
    current chunk from its right (a_{t+1} g_{t+1} of the next step); seeded from kin (dLoss/dh_final, or
    the carry pass's value for an inner segment); its value at the segment start is dLoss/dh0."""
    pid_b, seg, d3, md3, lane, n3, offs_t, st, mst, grp = _program(
        DIM, N, CH_PER_GROUP, s_sn, seg_base, BLOCK_D, LANES, SPT, BLOCK_T)
    u_ptr, dl_ptr, z_ptr, B_ptr, C_ptr = _row_pointers(u_ptr, dl_ptr, z_ptr, B_ptr, C_ptr, pid_b, grp,
                                                        s_ub, s_db, s_zb, s_bb, s_bg, s_cb, s_cg)
    dy_ptr += pid_b * s_ob
    du_ptr += pid_b * s_ob
    ddl_ptr += pid_b * s_ob
    dz_ptr += pid_b * s_ob
    # s_slot > 0 (deterministic mode): each block of channels adds into its own copy of dB / dC, summed on the
    # host in a fixed order; 0: every block adds into one copy (fp32 atomics, summed in arrival order).
    slot = tl.program_id(1).to(tl.int64) * s_slot
    dB_ptr += slot + (pid_b * G + grp) * N * L
    dC_ptr += slot + (pid_b * G + grp) * N * L
    # Per-program scratch: the chunk-start states of one checkpoint span.
    scr_ptr += ((pid_b * n_seg + seg) * tl.num_programs(1) + tl.program_id(1)) * SPAN_CHUNKS * LANES * SPT * BLOCK_D
    # Channels contiguous (s_scr = BLOCK_D, unspecialised): a thread's 8 fp32 states contiguous would be two
    # vector loads, and Triton would then spread the states over two lanes (and channels into registers).
    sst = n3 * s_scr + tl.arange(0, BLOCK_D)[None, None, :]
    slot = (pid_b * n_seg + seg) * N * DIM
    A2 = tl.load(A2_ptr + st, mask=mst, other=0.)
    bias = _channel_vector(bias_ptr, d3, md3, BLOCK_D, HAS_BIAS)
    Dv = _channel_vector(D_ptr, d3, md3, BLOCK_D, HAS_D)
    K = _state_or_zeros(kin_ptr, slot + st, mst, HAS_KIN, LANES, SPT, BLOCK_D)
    dA_acc = tl.zeros([LANES, SPT, BLOCK_D], tl.float32)
    dD_acc = tl.zeros([LANES, 1, BLOCK_D], tl.float32)
    dbias_acc = tl.zeros([LANES, 1, BLOCK_D], tl.float32)
    scr_step = LANES * SPT * BLOCK_D
    fwd_rows = ((u_ptr, s_ud, s_ul), (dl_ptr, s_dd, s_dl))
    fwd_cols = ((B_ptr, s_bn, s_bl),)
    bwd_rows = ((u_ptr, s_ud, s_ul), (dl_ptr, s_dd, s_dl), (dy_ptr, s_od, s_ol), (z_ptr, s_zd, s_zl))
    N_BWD_ROWS: tl.constexpr = 4 if HAS_Z else 3

    c0 = seg * seg_chunks
    c1 = tl.minimum(c0 + seg_chunks, n_chunks)
    k0 = c0 // SPAN_CHUNKS
    k1 = tl.cdiv(c1, SPAN_CHUNKS)
    for kk in range(k1 - k0):
        k = k1 - 1 - kk
        cs = k * SPAN_CHUNKS
        ce = tl.minimum(cs + SPAN_CHUNKS, c1)
        h = tl.load(ck_ptr + (pid_b * n_ckpt + k) * N * DIM + st, mask=mst, other=0.)
        # Re-run the forward over the span to recover each chunk's start state.
        fnx = _chunk_ahead(cs, fwd_rows, fwd_cols, offs_t, L, d3, md3, lane, n3, N, BLOCK_T, 2, 1)
        for c in range(cs, ce):
            tl.store(scr_ptr + (c - cs) * scr_step + sst, h)
            if c < ce - 1:
                t3, m3 = _steps(c, offs_t, L, md3, BLOCK_T)
                u_raw, dl_raw, B_c = fnx
                fnx = _chunk_ahead(c + 1, fwd_rows, fwd_cols, offs_t, L, d3, md3, lane, n3, N, BLOCK_T, 2, 1)
                _, dt = _delta(dl_raw, bias, m3, HAS_BIAS, SOFTPLUS)
                dtu = dt * u_raw.to(tl.float32)
                for i in tl.static_range(BLOCK_T):
                    ti = c * BLOCK_T + i
                    a = _decay(_row(dt, offs_t, i), A2, reset_ptr, ti, L, HAS_RESET)
                    h = a * h + _row(dtu, offs_t, i) * B_c[i].to(tl.float32)
        tl.debug_barrier()

        # Then its chunks backwards. (The start state is read where it is used: carried like the tiles, it
        # made Triton compute the state tiles in two layouts.)
        nx = _chunk_ahead(ce - 1, bwd_rows, (), offs_t, L, d3, md3, lane, n3, N, BLOCK_T, N_BWD_ROWS, 0)
        for cr in range(ce - cs):
            c = ce - 1 - cr
            h = tl.load(scr_ptr + (c - cs) * scr_step + sst)
            t3, m3 = _steps(c, offs_t, L, md3, BLOCK_T)
            u_raw, dl_raw, dy_raw, z_raw = nx
            nx = _chunk_ahead(c - 1, bwd_rows, (), offs_t, L, d3, md3, lane, n3, N, BLOCK_T, N_BWD_ROWS, 0)
            u = u_raw.to(tl.float32)
            dr, dt = _delta(dl_raw, bias, m3, HAS_BIAS, SOFTPLUS)
            dtu = dt * u
            dy = dy_raw.to(tl.float32)
            # Forward through the chunk, keeping every step's state (a tuple of register tiles).
            hs = ()
            y = tl.zeros([LANES, BLOCK_T, BLOCK_D], tl.float32)
            for i in tl.static_range(BLOCK_T):
                ti = c * BLOCK_T + i
                a = _decay(_row(dt, offs_t, i), A2, reset_ptr, ti, L, HAS_RESET)
                h = a * h + _row(dtu, offs_t, i) * _step_in(B_ptr, n3, d3, N, ti, L, s_bn, s_bl)
                hs = hs + (h,)
                if HAS_Z:
                    y = _put_row(y, offs_t, i, _nsum(h * _step_in(C_ptr, n3, d3, N, ti, L, s_cn, s_cl)))
            if HAS_Z:
                zt = z_raw.to(tl.float32)
                sig = tl.sigmoid(zt)
                y += Dv * u
                _put_tile(dz_ptr, dy * y * sig * (1. + zt * (1. - sig)), t3, m3, d3, lane, s_od, s_ol)
                dy = dy * zt * sig
            dD_acc += tl.sum(dy * u, axis=1)[:, None, :]
            du = dy * Dv
            ddt = tl.zeros([LANES, BLOCK_T, BLOCK_D], tl.float32)
            for ir in tl.static_range(BLOCK_T):
                r = BLOCK_T - 1 - ir
                ti = c * BLOCK_T + r
                dt_i = _row(dt, offs_t, r)
                dtu_i = _row(dtu, offs_t, r)
                dy_i = _row(dy, offs_t, r)
                Bi = _step_in(B_ptr, n3, d3, N, ti, L, s_bn, s_bl)
                g = K + _step_in(C_ptr, n3, d3, N, ti, L, s_cn, s_cl) * dy_i      # dLoss/dh_t
                h_i = hs[BLOCK_T - 1 - ir]
                _add_channel_sums(dC_ptr, dB_ptr, h_i * dy_i, g * dtu_i, lane, ti, N, L, SPT, BLOCK_D, LANE_EXCHANGE)
                gh = g * (h_i - dtu_i * Bi)                                             # g_t a_t h_{t-1}
                dA_acc += gh * dt_i
                gB = _nsum(g * Bi)
                du = _put_row(du, offs_t, r, _row(du, offs_t, r) + dt_i * gB)
                ddt = _put_row(ddt, offs_t, r, _nsum(gh * A2) * 0.6931471805599453
                               + _row(u, offs_t, r) * gB)                       # A = A2 ln 2
                K = _decay(dt_i, A2, reset_ptr, ti, L, HAS_RESET) * g
            if SOFTPLUS:
                ddt = ddt * tl.sigmoid(dr)
            ddt = tl.where(m3, ddt, 0.)
            dbias_acc += tl.sum(ddt, axis=1)[:, None, :]
            _put_tile(du_ptr, du, t3, m3, d3, lane, s_od, s_ol)
            _put_tile(ddl_ptr, ddt, t3, m3, d3, lane, s_od, s_ol)
        tl.debug_barrier()

    tl.store(kout_ptr + slot + st, K, mask=mst)
    tl.store(dA_ptr + slot + st, dA_acc, mask=mst)
    _per_channel_store(dD_ptr + (pid_b * n_seg + seg) * DIM, dD_acc, d3, md3, lane)
    _per_channel_store(dbias_ptr + (pid_b * n_seg + seg) * DIM, dbias_acc, d3, md3, lane)


# ------------------------------------------------------------------------------------------------------
# Launch configuration
# ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ScanConfig:
    """Tiles. block_d channels per program (32 * warps / block_d lanes share a channel's states);
    block_t / block_t_bwd steps per unrolled chunk; a checkpoint every ckpt_chunks forward chunks;
    seg_chunks > 0 cuts the sequence into segments of that many forward chunks run in parallel (a multiple
    of ckpt_chunks; 0 = one segment)."""
    block_t: int = 8
    block_t_bwd: int = 4
    block_d: int = 32
    ckpt_chunks: int = 8
    seg_chunks: int = 0
    warps: int = 1
    stages: int = 3

    def __post_init__(self):
        span = self.block_t * self.ckpt_chunks
        if self.block_t % self.block_t_bwd or span % self.block_t_bwd or (
                self.seg_chunks and self.seg_chunks % self.ckpt_chunks):
            raise ValueError(f"ScanConfig: block_t_bwd must divide block_t, and seg_chunks must be a multiple of "
                             f"ckpt_chunks; got {self}")


def _pow2_divisor(n: int, cap: int) -> int:
    """Largest power of two <= cap that divides n."""
    p = 1
    while p * 2 <= cap and n % (p * 2) == 0:
        p *= 2
    return p


def _sm_count() -> int:
    if not torch.cuda.is_available():
        return 132
    return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count


def default_config(dim: int, L: int, N: int, groups: int = 1, batch: int = 8, block_t: int = 8,
                   block_t_bwd: int = 4, states_per_thread: int = 8, split_below: float = 2.0,
                   programs_per_sm: float = 32.0, ckpt_bytes_per_step: float = 1.0) -> ScanConfig:
    """At most `states_per_thread` states in a lane (more lanes share a channel when N is larger), one warp
    per program. Checkpoints cost N*4/(ckpt_chunks*block_t) bytes per (batch, channel, step): about
    ckpt_bytes_per_step, which keeps them plus y under what the anchor saves (H100, genomics LM of 16
    Mamba(256) blocks at 128 x 1,024 tokens: 9.8 / 9.4 / 9.2 / 9.0 GiB with 1.5 / 1.0 / 0.75 / 0.5 bytes, step
    104.9 / 104.7 / 108.5 / 107.8 ms; the anchor 9.6 GiB). When batch * dim / block_d
    programs give fewer than `split_below` per SM, the sequence is cut into parallel segments, enough for
    `programs_per_sm` (H100, forward+backward: (4, 512, 16, 32768) 8.86 / 7.01 / 6.10 ms with 8 / 16 / 32
    programs per SM, (1, 1536, 16, 262144) 38.7 / 36.5 / 36.0 ms; at batch 8, 3 segments were slower than
    none: the summary pass costs more than it gains)."""
    bn = triton.next_power_of_2(N)
    lanes_n = min(32, max(1, bn // states_per_thread))
    bd = min(32 // lanes_n, triton.next_power_of_2(dim))
    if groups > 1:  # a program's channels must share one B/C group
        bd = _pow2_divisor(dim // groups, bd)
    bt = max(1, min(block_t, triton.next_power_of_2(L)))
    btb = max(1, min(block_t_bwd, bt))
    ckpt_chunks = max(1, min(256 // bt, math.ceil(N * 4 / (ckpt_bytes_per_step * bt))))
    n_spans = triton.cdiv(triton.cdiv(L, bt), ckpt_chunks)
    programs = batch * triton.cdiv(dim, bd)
    sms = _sm_count()
    n_seg = min(n_spans, math.ceil(programs_per_sm * sms / programs)) if programs < split_below * sms else 1
    seg_chunks = triton.cdiv(n_spans, n_seg) * ckpt_chunks if n_seg > 1 else 0
    return ScanConfig(bt, btb, bd, ckpt_chunks, seg_chunks)


# ------------------------------------------------------------------------------------------------------
# Host side
# ------------------------------------------------------------------------------------------------------
def _last_contig(x: torch.Tensor | None) -> torch.Tensor | None:
    # Chunks read along L: keep that axis unit-stride (as the anchor does). Other strides are free, so a
    # slice of a (channels, batch * L) matrix (the fused block's layout) is read in place.
    if x is None or x.stride(-1) == 1:
        return x
    return x.contiguous()


def _io_like(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """x with the strides of `like` (y, dy and the gradients share one layout in the kernels)."""
    if x.stride() == like.stride():
        return x
    return torch.empty_strided(like.shape, like.stride(), device=x.device, dtype=x.dtype).copy_(x)


def _a2t(A: torch.Tensor) -> torch.Tensor:
    """(N, dim) fp32 A * log2(e): exp(dt A) = exp2(dt A2), states laid out like the kernels' state tiles."""
    return (A.float() * LOG2E).t().contiguous()


def bc_lmajor(X: torch.Tensor) -> torch.Tensor:
    """The same (..., N, L) view of B or C with the states unit-stride: a step's states are one vector load."""
    return X if X.stride(-2) == 1 else X.transpose(-1, -2).contiguous().transpose(-1, -2)


def _lanes(N: int, block_d: int, warps: int) -> dict:
    """LANES lanes share a channel's states, SPT states each (the state tile is (LANES, SPT, block_d))."""
    bn = triton.next_power_of_2(N)
    lanes = min(32 * warps // block_d, bn)
    return dict(LANES=lanes, SPT=bn // lanes)


_EXCHANGE_OK: dict = {}


def _spec_key(args, kwargs) -> tuple:
    """At least what Triton specialises a launch on (tensors: dtype, 16-byte alignment; ints: equal to 1,
    divisible by 16, 32-bit; constexprs): launches with one key run one compiled kernel."""
    def one(a):
        if isinstance(a, torch.Tensor):
            return a.dtype, a.data_ptr() % 16 == 0
        if isinstance(a, int) and not isinstance(a, bool):
            return a == 1, a % 16 == 0, -2 ** 31 <= a < 2 ** 31
        return a
    return tuple(map(one, args)) + tuple(sorted(kwargs.items()))


def _channels_on_lanes(kernel, block_d: int) -> bool:
    """Whether every lane exchange (inline asm) of a compiled kernel runs on a layout with each lane holding one
    channel: sizePerThread 1 and at least block_d lanes along the channel axis."""
    ttgir = kernel.asm["ttgir"]
    layouts = dict(re.findall(r"^(#\w+) = #ttg\.blocked<\{(.*)\}>", ttgir, re.M))
    used = re.findall(r"elementwise_inline_asm.*-> tensor<[^,>]+, (#\w+)>", ttgir)
    for name in set(used):
        spec = layouts.get(name, "")
        size = re.search(r"sizePerThread = \[(\d+), (\d+), (\d+)\]", spec)
        threads = re.search(r"threadsPerWarp = \[(\d+), (\d+), (\d+)\]", spec)
        if not (size and threads and size.group(3) == "1" and int(threads.group(3)) >= block_d):
            return False
    return bool(used)


def _lane_exchange(args, kwargs, grid, block_d: int) -> bool:
    """Sum dB/dC over channels by reduce-scatter (see _add_channel_sums)? Its shuffles need the channels on
    lanes, and where Triton puts them depends on dtypes, strides and alignment (fp32 B/C: a lane's 8 states
    are two vector loads, which Triton spreads over two lanes; unaligned strides: scalar loads). So each
    specialisation is compiled once with the exchange and its layout read back; if a channel bit landed in
    registers, that specialisation runs the butterfly. The interpreter emulates the exchange: always on."""
    if _INTERPRET.value:
        return True
    key = _spec_key(args, kwargs)
    if key not in _EXCHANGE_OK:
        kernel = _scan_bwd_kernel.warmup(*args, grid=grid, LANE_EXCHANGE=True, **kwargs)
        _EXCHANGE_OK[key] = _channels_on_lanes(kernel, block_d)
    return _EXCHANGE_OK[key]


def _flags(D, z, delta_bias, softplus, reset):
    return dict(HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
                SOFTPLUS=bool(softplus), HAS_RESET=reset is not None)


def _segments(cfg: ScanConfig, L: int, reset) -> tuple[int, int, int]:
    """(forward chunks, chunks per segment, segments). Packed sequences run as one segment."""
    n_chunks = triton.cdiv(L, cfg.block_t)
    seg_chunks = cfg.seg_chunks if cfg.seg_chunks and reset is None else n_chunks
    return n_chunks, seg_chunks, triton.cdiv(n_chunks, seg_chunks)


def _carry(loc, dts, A2t, first, out, reverse: bool):
    b, n_seg, N, dim = out.shape
    bd = min(128, triton.next_power_of_2(dim))
    _segment_carry_kernel[(b, triton.cdiv(dim, bd), 1)](
        loc, dts, A2t, first, out, dim, N, n_seg, dim, HAS_FIRST=first is not None, REVERSE=reverse,
        BLOCK_D=bd, BLOCK_N=triton.next_power_of_2(N), num_warps=4)


def _scan_fwd(u, delta, A2t, B, C, D, z, delta_bias, softplus, h0t, reset, cfg: ScanConfig, y=None):
    """y, final state (b, dim, N), checkpoints (b, n_ckpt, N, dim) and per-segment sums of dt (b, S, dim).
    y may be given (any layout with unit stride along L)."""
    b, dim, L = u.shape
    N = A2t.shape[0]
    G = 1 if B.dim() == 3 else B.shape[1]
    n_chunks, seg_chunks, n_seg = _segments(cfg, L, reset)
    n_ckpt = triton.cdiv(n_chunks, cfg.ckpt_chunks)
    f32 = dict(device=u.device, dtype=torch.float32)
    y = torch.empty(b, dim, L, device=u.device, dtype=u.dtype) if y is None else y
    hout = torch.empty(b, n_seg, N, dim, **f32)
    ck = torch.empty(b, n_ckpt, N, dim, **f32)
    dts = torch.empty(b, n_seg, dim, **f32)
    zz = z if z is not None else u

    def launch(n_programs, hin, out, summary):
        _scan_fwd_kernel[(b, triton.cdiv(dim, cfg.block_d), n_programs)](
            u, delta, A2t, B, C, D, zz, delta_bias, reset, hin, y, out, ck, dts,
            L, dim, N, dim // G, n_chunks, seg_chunks, n_seg, 0, n_ckpt, dim,
            *u.stride(), *delta.stride(), *zz.stride(), *group_strides(B, 3), *group_strides(C, 3), *y.stride(),
            HAS_H0=hin is not None, SUMMARY=summary, BLOCK_D=cfg.block_d, BLOCK_T=cfg.block_t,
            **_lanes(N, cfg.block_d, cfg.warps), CKPT_CHUNKS=cfg.ckpt_chunks, num_warps=cfg.warps,
            num_stages=cfg.stages, **_flags(D, z, delta_bias, softplus, reset))

    if n_seg > 1:
        hloc = torch.empty(b, n_seg, N, dim, **f32)
        launch(n_seg - 1, None, hloc, True)          # segments 0..S-2 from zero: end states, sums of dt
        hin = torch.empty(b, n_seg, N, dim, **f32)
        _carry(hloc, dts, A2t, h0t, hin, reverse=False)
        launch(n_seg, hin, hout, False)
    else:
        launch(1, h0t, hout, False)
    return y, hout[:, -1].transpose(1, 2), ck, dts


def _scan_bwd(u, delta, A2t, B, C, D, z, delta_bias, softplus, reset, ck, dts, dy, dhT, cfg: ScanConfig,
              du=None, ddelta=None, dz=None):
    """Gradients; du, ddelta, dz may be given (one shared layout, unit stride along L; dy is brought to it)."""
    b, dim, L = u.shape
    N = A2t.shape[0]
    G = 1 if B.dim() == 3 else B.shape[1]
    dev = u.device
    f32 = dict(device=dev, dtype=torch.float32)
    _, seg_chunks, n_seg = _segments(cfg, L, reset)
    ratio = cfg.block_t // cfg.block_t_bwd      # backward chunks per forward chunk
    n_chunks = triton.cdiv(L, cfg.block_t_bwd)
    seg_chunks *= ratio
    span = cfg.ckpt_chunks * ratio
    bn = triton.next_power_of_2(N)
    bd = cfg.block_d
    n_db = triton.cdiv(dim, bd)
    zz = z if z is not None else u
    dhTt = dhT.transpose(1, 2).contiguous() if dhT is not None else None
    common = dict(BLOCK_D=bd, BLOCK_T=cfg.block_t_bwd, **_lanes(N, bd, cfg.warps), num_warps=cfg.warps,
                  num_stages=cfg.stages)
    du = torch.empty(b, dim, L, device=dev, dtype=u.dtype) if du is None else du
    ddelta = torch.empty_like(du, dtype=delta.dtype) if ddelta is None else ddelta
    if z is not None and dz is None:
        dz = torch.empty_like(du, dtype=z.dtype)
    if ddelta.stride() != du.stride() or (dz is not None and dz.stride() != du.stride()) or du.stride(-1) != 1:
        raise ValueError("_scan_bwd: du, ddelta and dz must share one layout with unit stride along L")
    dy = _io_like(dy, du)
    if n_seg > 1:
        kloc = torch.empty(b, n_seg, N, dim, **f32)
        _adjoint_summary_kernel[(b, n_db, n_seg - 1)](   # segments 1..S-1, nothing flowing in from the right
            delta, A2t, C, zz, delta_bias, reset, dy, kloc,
            L, dim, N, dim // G, n_chunks, seg_chunks, n_seg, 1, dim,
            *delta.stride(), *zz.stride(), *group_strides(C, 3), *dy.stride(),
            HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(softplus),
            HAS_RESET=reset is not None, **common)
        kin = torch.empty(b, n_seg, N, dim, **f32)
        _carry(kloc, dts, A2t, dhTt, kin, reverse=True)
    else:
        kin = dhTt
    scratch = torch.empty(b * n_seg * n_db * span * bn * bd, **f32)
    slots = partial_slots(n_db)
    dB = torch.zeros(slots, b, G, N, L, **f32)
    dC = torch.zeros(slots, b, G, N, L, **f32)
    kout = torch.empty(b, n_seg, N, dim, **f32)
    dA = torch.empty(b, n_seg, N, dim, **f32)
    dD = torch.empty(b, n_seg, dim, **f32)
    dbias = torch.empty(b, n_seg, dim, **f32)
    args = (u, delta, A2t, B, C, D, zz, delta_bias, reset, ck, dy, kin, scratch,
            du, ddelta, dz if dz is not None else du, dA, dB, dC, dD, dbias, kout,
            L, dim, N, G, dim // G, n_chunks, seg_chunks, n_seg, 0, ck.shape[1], dim, bd, dB[0].numel() if slots > 1 else 0,
            *u.stride(), *delta.stride(), *zz.stride(), *group_strides(B, 3), *group_strides(C, 3), *du.stride())
    kw = dict(HAS_KIN=kin is not None, SPAN_CHUNKS=span, **common, **_flags(D, z, delta_bias, softplus, reset))
    grid = (b, n_db, n_seg)
    _scan_bwd_kernel[grid](*args, LANE_EXCHANGE=_lane_exchange(args, kw, grid, bd), **kw)
    dB, dC = slots_sum(dB), slots_sum(dC)
    if B.dim() == 3:
        dB, dC = dB[:, 0], dC[:, 0]
    return (du, ddelta, dA.sum((0, 1)).t(), dB, dC, dD.sum((0, 1)), dz if z is not None else None,
            dbias.sum((0, 1)), kout[:, 0].transpose(1, 2))


class _SelectiveScanFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, h0, softplus, cfg, reset):
        A2t = _a2t(A)
        h0t = h0.float().transpose(1, 2).contiguous() if h0 is not None else None
        Bf, Cf = bc_lmajor(B), bc_lmajor(C)
        y, hT, ck, dts = _scan_fwd(u, delta, A2t, Bf, Cf, D, z, delta_bias, softplus, h0t, reset, cfg)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, ck, dts)
        ctx.softplus, ctx.cfg, ctx.reset = softplus, cfg, reset
        ctx.set_materialize_grads(False)
        return y, hT

    @staticmethod
    def backward(ctx, dy, dhT):
        u, delta, A, B, C, D, z, delta_bias, ck, dts = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros_like(u)
        dhT = dhT.float() if dhT is not None else None
        A2t = _a2t(A)
        B, C = bc_lmajor(B), bc_lmajor(C)
        du, ddelta, dA, dB, dC, dD, dz, dbias, dh0 = _scan_bwd(
            u, delta, A2t, B, C, D, z, delta_bias, ctx.softplus, ctx.reset, ck, dts, dy, dhT, ctx.cfg)
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
        cfg = dataclasses.replace(cfg, block_d=_pow2_divisor(dim // G, cfg.block_d))
    u, delta, z, B, C = (_last_contig(t) for t in (u, delta, z, B, C))
    A = A.float().contiguous() if A.dtype != torch.float32 or not A.is_contiguous() else A
    D = D.float().contiguous() if D is not None else None
    delta_bias = delta_bias.float().contiguous() if delta_bias is not None else None
    h0 = h0.float().contiguous() if h0 is not None else None
    y, hT = _SelectiveScanFn.apply(u, delta, A, B, C, D, z, delta_bias, h0, bool(delta_softplus), cfg, reset)
    return (y, hT) if return_final_state else y
