"""The fast CPU path.

1. `selective_scan` with the exact signature and semantics of `selective_scan_ref`: `ssm_core.ops` sends CPU
   tensors here. `causal_conv1d` and `selective_state_update` are deliberately not overridden: their
   references are already one `F.conv1d` / a handful of ops, and the streaming hot path fuses both into its
   own few ops.
2. `stream_steps`: `Mamba.stream` on a short CPU chunk (the streaming hot path, e.g. 20 ms of audio), with
   the module's weights laid out once (`stream_weights`) and scratch buffers kept in the state.

Why a loop and not a parallel (log-space / chunked-matrix) scan: on a CPU one PyTorch op costs a few
microseconds of dispatch, and the exponential of dt*A, which every formulation needs once per
(batch, dim, step, state), costs ~2 ns. A step of the recurrence over a (batch, dim, N) slice is then
a single fused `addcmul_` whose dispatch is amortised over thousands of elements, while a chunked
log-space scan needs two extra cumulative sums, a second exponential (or a division) and stabilising
offsets (docs/cpu.md has the measurements). So the scan runs in time chunks of T steps:

    1. vectorised over the chunk:  dA = exp(dt * A),  X = dt * u * B      (T, batch, G, dim/G, N)
    2. the recurrence, one op a step, in place:  X[t] += dA[t] * X[t-1]   (X becomes the states h)
    3. vectorised over the chunk:  y = <h, C>  as one batched matmul

and only the state at each chunk start is kept for the backward pass, which recomputes a chunk's
states from it and runs the adjoint recurrence backwards the same way. Memory is
O(batch * dim * (L + N * L / T)) with T * batch * dim * N ~ CHUNK_ELEMS, never the (batch, dim, L, N)
state history. Arithmetic is the reference's own recurrence, step for step, so results agree to fp32
rounding for any A and delta (no exp of a positive cumulative sum that could overflow).

This module names no op other than those it overrides: `ssm_core.ops` looks ops up here by name.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from .reference import check_scan_inputs, scan_step_sizes

# Elements of one chunk's (T, batch, dim, N) work buffers: ~1-2 MiB in fp32 keeps them in L2/L3 while
# still amortising per-step dispatch over T steps of vectorised exp / matmul.
CHUNK_ELEMS = 1 << 18
MAX_CHUNK = 1024


def _chunk_len(L: int, bdn: int) -> int:
    return max(1, min(L, MAX_CHUNK, CHUNK_ELEMS // max(bdn, 1)))


def _scan_forward(dt, w, A, B, C, h0, save_starts: bool):
    """The recurrence, time-major. dt, w: (L, b, G, dg) step size and dt * u;  A: (G, dg, N);
    B, C: (L, b, G, N);  h0: (b, G, dg, N).   h_t = exp(dt_t A) h_{t-1} + w_t B_t,   y_t = <h_t, C_t>.
    Returns y (L, b, G, dg), the final state (a new tensor) and, if asked, the state before each chunk."""
    L, b, G, dg = dt.shape
    N = A.shape[-1]
    T = _chunk_len(L, b * G * dg * N)
    y = dt.new_empty(L, b, G, dg)
    dA = dt.new_empty(T, b, G, dg, N)
    H = dt.new_empty(T, b, G, dg, N)
    h = h0.clone()
    starts = dt.new_empty((L + T - 1) // T, b, G, dg, N) if save_starts else None
    for k, s in enumerate(range(0, L, T)):
        n = min(T, L - s)
        sl, m = slice(s, s + n), n * b * G
        dA_c, H_c = dA[:n], H[:n]
        if starts is not None:
            starts[k].copy_(h)
        torch.mul(dt[sl].unsqueeze(-1), A, out=dA_c).exp_()
        torch.mul(w[sl].unsqueeze(-1), B[sl].unsqueeze(-2), out=H_c)
        Hs, dAs = H_c.unbind(0), dA_c.unbind(0)
        Hs[0].addcmul_(dAs[0], h)
        for t in range(1, n):
            Hs[t].addcmul_(dAs[t], Hs[t - 1])
        h.copy_(Hs[n - 1])
        # y_t = <h_t, C_t> as (m, 1, N) @ (m, N, dg): of the batched-matmul layouts the fastest on CPU.
        torch.matmul(C[sl].view(m, 1, N), H_c.view(m, dg, N).mT, out=y[sl].view(m, 1, dg))
    return y, h, starts


def _scan_backward(dt, w, A, B, C, starts, gy, gh):
    """Gradients of `_scan_forward` given dL/dy (L, b, G, dg) and dL/dh_final (b, G, dg, N) or None.

    The adjoint  lam_t = dL/dh_t  obeys  lam_t = gy_t C_t + exp(dt_{t+1} A) lam_{t+1}; then
    d(dt_t A) = lam_t * exp(dt_t A) * h_{t-1}, from which every gradient follows, and dL/dh_{-1} (h0's
    gradient, or the carry into the previous chunk) is exp(dt_0 A) * lam_0.
    Chunks are visited last to first, each recomputing its states from its saved start."""
    L, b, G, dg = dt.shape
    N = A.shape[-1]
    T = _chunk_len(L, b * G * dg * N)
    d_dt, d_w = torch.empty_like(dt), torch.empty_like(w)
    d_B, d_C = torch.empty_like(B), torch.empty_like(C)
    d_A = torch.zeros_like(A)
    dA, H, Lam = (dt.new_empty(T, b, G, dg, N) for _ in range(3))
    carry = gh.clone() if gh is not None else dt.new_zeros(b, G, dg, N)  # dL/dh at the chunk's last step
    chunk_starts = list(range(0, L, T))
    for k in reversed(range(len(chunk_starts))):
        s = chunk_starts[k]
        n = min(T, L - s)
        sl, m = slice(s, s + n), n * b * G
        dA_c, H_c, Lam_c = dA[:n], H[:n], Lam[:n]
        dt_c, w_c, gy_c = dt[sl], w[sl], gy[sl]
        torch.mul(dt_c.unsqueeze(-1), A, out=dA_c).exp_()
        torch.mul(w_c.unsqueeze(-1), B[sl].unsqueeze(-2), out=H_c)
        Hs, dAs, Ls = H_c.unbind(0), dA_c.unbind(0), Lam_c.unbind(0)
        Hs[0].addcmul_(dAs[0], starts[k])
        for t in range(1, n):
            Hs[t].addcmul_(dAs[t], Hs[t - 1])
        torch.mul(gy_c.unsqueeze(-1), C[sl].unsqueeze(-2), out=Lam_c)
        Ls[n - 1].add_(carry)
        for t in range(n - 2, -1, -1):
            Ls[t].addcmul_(dAs[t + 1], Ls[t + 1])
        # dC_t = sum_j gy_tj h_tj,  dB_t = sum_j w_tj lam_tj,  d_w_t = <lam_t, B_t>
        torch.matmul(gy_c.view(m, 1, dg), H_c.view(m, dg, N), out=d_C[sl].view(m, 1, N))
        torch.matmul(w_c.view(m, 1, dg), Lam_c.view(m, dg, N), out=d_B[sl].view(m, 1, N))
        torch.matmul(B[sl].view(m, 1, N), Lam_c.view(m, dg, N).mT, out=d_w[sl].view(m, 1, dg))
        da = dA_c.mul_(Lam_c)                  # exp(dt A) * lam, in place of exp(dt A) (no longer needed)
        carry.copy_(da[0])
        da[1:].mul_(H_c[:-1])                  # * h_{t-1}: now dL/d(dt_t A)
        da[0].mul_(starts[k])
        torch.sum(torch.mul(da, A, out=Lam_c), -1, out=d_dt[sl])
        d_A += torch.mul(da, dt_c.unsqueeze(-1), out=H_c).sum((0, 1))
    return d_dt, d_w, d_A, d_B, d_C, carry


def _time_major(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(b, d, L) -> contiguous (L, b, G, d/G)."""
    b, d, L = x.shape
    return x.reshape(b * d, L).t().contiguous().view(L, b, groups, d // groups)


class _Scan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, dt, w, A, B, C, h0):
        save = any(ctx.needs_input_grad)
        y, h, starts = _scan_forward(dt, w, A, B, C, h0, save_starts=save)
        if save:
            ctx.save_for_backward(dt, w, A, B, C, starts)
        return y, h

    @staticmethod
    def backward(ctx, gy, gh):
        dt, w, A, B, C, starts = ctx.saved_tensors
        gy = torch.zeros_like(dt) if gy is None else gy.contiguous()
        return _scan_backward(dt, w, A, B, C, starts, gy, gh)


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   h0=None, return_final_state=False):
    """`selective_scan_ref` on the CPU, fast: same signature, results equal to fp32 rounding, forward and
    backward (gradients for every input, h0 and through the final state). See the module docstring."""
    b, d, L, n, g = check_scan_inputs(u, delta, A, B, C, D, z, delta_bias, h0)
    dg = d // g
    ct, uf, dt = scan_step_sizes(u, delta, delta_bias, delta_softplus)
    # Autograd carries gradients through the softplus, dt * u, the D and z terms and these layout changes
    # (all O(b*d*L)); _Scan holds the O(b*d*L*N) part. Time-major so a step is one contiguous slice; a
    # (b*d, L) -> (L, b*d) 2-D transpose is ~3x cheaper than the equivalent 3-D permute copy.
    B4, C4 = (B, C) if B.dim() == 4 else (B.unsqueeze(1), C.unsqueeze(1))
    B_t = B4.to(ct).permute(3, 0, 1, 2).contiguous()                     # (L, b, G, N)
    C_t = C4.to(ct).permute(3, 0, 1, 2).contiguous()
    h_init = h0.to(ct).reshape(b, g, dg, n) if h0 is not None else uf.new_zeros(b, g, dg, n)
    y, h = _Scan.apply(_time_major(dt, g), _time_major(dt * uf, g), A.to(ct).reshape(g, dg, n), B_t, C_t, h_init)
    y = y.view(L, b * d).t().contiguous().view(b, d, L)
    if D is not None:
        y = y + uf * D.to(ct)[:, None]
    if z is not None:
        y = y * F.silu(z.to(ct))
    y = y.to(u.dtype).contiguous()
    return (y, h.reshape(b, d, n)) if return_final_state else y


# --- streaming short chunks (Mamba.stream on the CPU) --------------------------------------------------
# Chunks up to this many steps stream step by step on the CPU (stream_steps); longer ones go
# through the chunked scan. Both give forward's results; this only picks the faster.
STREAM_STEPS = 16
# A state keeps the step path's scratch buffers for at most this many chunk lengths (a live source may
# alternate between a few, e.g. 2 and 3 frames).
SCRATCH_LENGTHS = 4
LOG2E = math.log2(math.e)   # exp(x) = exp2(x log2 e); exp2 is the cheaper op on a CPU


class StepWeights:
    """A `Mamba`'s weights laid out for `stream_steps` (see `stream_weights` for when they are remade):
    transposed views for the matmuls, the conv taps as K (d_inner,) rows, A log2(e) for exp2, x_proj and
    dt_proj rearranged so that dt_proj's bias rides in its matmul."""

    def __init__(self, m, params: tuple, key: tuple):
        # Holding the parameters keeps their memory from being reused by a new tensor at the same address,
        # which would otherwise match the cache key.
        self.key, self.params = key, tuple(p.detach() for p in params)
        # The step path runs in one dtype; a module whose parameters mix dtypes takes the general path.
        dtypes = {p.dtype for p in params}
        self.dtype = dtypes.pop() if len(dtypes) == 1 else None
        self.in_t, self.in_bias = m.in_proj.weight.detach().t(), _detached(m.in_proj.bias)
        self.conv_taps = m.conv1d.weight.detach()[:, 0].t().contiguous().unbind(0)     # K x (d_inner,)
        self.conv_bias = _detached(m.conv1d.bias)
        # x_proj's rows reordered to [B, C, dt_low] and dt_proj's bias appended as a last row of its weight:
        # with a column of ones after dt_low (see StepScratch.x_dbl), dt_proj and its bias are one matmul.
        r = m.dt_rank
        x_w = m.x_proj.weight.detach()
        self.x_t = torch.cat([x_w[r:], x_w[:r]]).t()
        # A, D and dt_proj's bias pass through float32 as in `forward` (mamba_ssm's choice), then take the
        # compute dtype, so float64 models stream to float64 rounding of forward.
        dt_w, dtype = m.dt_proj.weight.detach(), m.in_proj.weight.dtype
        self.dt_t = torch.cat([dt_w.t(), m.dt_proj.bias.detach().float().to(dtype)[None]])   # (r + 1, di)
        self.A_log2e = (-torch.exp(m.A_log.detach().float())).to(dtype) * LOG2E           # (d_inner, N)
        self.D = m.D.detach().float().to(dtype)
        self.out_t, self.out_bias = m.out_proj.weight.detach().t(), _detached(m.out_proj.bias)


class StepScratch:
    """The buffers of `stream_steps` for (batch, T) and the views it uses, made once: the hot path
    then only indexes attributes."""

    def __init__(self, m, b: int, T: int, dtype: torch.dtype, device):
        di, K, N, r = m.d_inner, m.d_conv, m.d_state, m.dt_rank
        new = functools.partial(torch.empty, dtype=dtype, device=device)
        # in_proj's output goes after K - 1 rows that take the carried conv inputs, so the u columns of
        # the whole buffer are the conv's time-major input window without copying the chunk into it. For
        # batch 1 its T rows are one matrix that the matmul writes; a larger batch copies them in.
        xzw = new(b, K - 1 + T, 2 * di)
        xz = xzw[:, K - 1:]
        self.xz_out = xz[0] if b == 1 else new(b * T, 2 * di)
        self.xz_copy = None if b == 1 else (xz, self.xz_out.view(b, T, 2 * di))   # (destination, source)
        self.u, self.z = xz[..., :di], xz[..., di:]
        win = xzw[..., :di]                                            # conv inputs, time-major
        self.win_head = win[:, :K - 1].transpose(1, 2)                 # the carried tail, state.conv's layout
        self.win_tail = win[:, T:].transpose(1, 2)                     # the tail to carry on
        self.taps = tuple(win[:, k:k + T] for k in range(K))           # the inputs of tap k for all T steps
        self.uc = new(b, T, di)                                        # conv + silu output
        self.uc2 = self.uc.view(b * T, di)
        # x_proj output as [B, C, dt_low, 1]: the trailing ones multiply dt_proj's bias row (StepWeights).
        self.x_dbl = new(b * T, 2 * N + r + 1)
        self.x_dbl[:, -1] = 1
        self.x_out = self.x_dbl[:, :-1]
        self.B4 = self.x_dbl[:, :N].view(b, T, 1, N)
        self.C3 = self.x_dbl[:, None, N:2 * N]                         # (b*T, 1, N)
        self.dt_low = self.x_dbl[:, 2 * N:]                            # dt_low and the ones column
        self.dt = new(b * T, di)
        self.dt3, self.dt4 = self.dt.view(b, T, di), self.dt.view(b, T, di, 1)
        self.du = new(b, T, di)                                        # dt * u
        self.du4 = self.du.unsqueeze(-1)
        self.dA, self.H = new(b, T, di, N), new(b, T, di, N)
        self.dA_steps, self.H_steps = self.dA.unbind(1), self.H.unbind(1)
        self.H3t = self.H.view(b * T, di, N).transpose(1, 2)
        self.y = new(b * T, 1, di)
        self.y3, self.y2 = self.y.view(b, T, di), self.y.view(b * T, di)


def params_key(params) -> tuple | None:
    """What identifies the values of `params` for a cache: each one's version counter (bumped by every
    in-place update: optimiser steps, `load_state_dict`, `nn.init`) and data pointer (a new tensor: `.to()`,
    `.data = ...`). None for inference tensors (a model built under `torch.inference_mode`), which have no
    version counter: those are not cached. Not seen: writes through a parameter's `.data`, which bypass
    its version counter."""
    try:
        return tuple([(p._version, p.data_ptr()) for p in params])
    except RuntimeError:
        return None


def _detached(p: torch.Tensor | None) -> torch.Tensor | None:
    return None if p is None else p.detach()


def stream_weights(m) -> StepWeights:
    """Mamba `m`'s weights in the layout `stream_steps` wants, made once and kept on the module until a
    parameter changes (`params_key` of all of them)."""
    # Read from the modules' parameter dicts each call (~3 us): a replaced parameter or submodule is seen.
    params = [p for mod in (m, *m._modules.values()) for p in mod._parameters.values() if p is not None]
    key = params_key(params)
    cache = m.__dict__.get("_stream_cache")
    if key is None or cache is None or cache.key != key:
        with torch.no_grad(), torch.inference_mode(False):   # plain tensors, usable outside inference mode
            cache = StepWeights(m, params, key)
        if key is not None:
            m.__dict__["_stream_cache"] = cache
    return cache


def stream_steps(m, x: torch.Tensor, state, residual: torch.Tensor | None, w: StepWeights) -> torch.Tensor:
    """A short chunk on the CPU (e.g. a 20 ms audio chunk, 2 frames): the streaming hot path. At this
    size per-op dispatch, not FLOPs, is the cost, so everything but the state recurrence (one fused op
    a step) is vectorised over the T steps, every intermediate is written into scratch buffers kept in
    the state (no allocation per call but the returned output), the views of those buffers are made
    once, and the weights come pre-laid-out from `stream_weights`. Same arithmetic as `Mamba.forward` but
    exp(dt A) computed as exp2(dt A log2 e), which is ~2x faster here. Mamba `m`, x (b, T, d_model) -> y
    (plus `residual` if given); `state` a MambaState, updated in place; `w` from `stream_weights`."""
    b, T, _ = x.shape
    s = state.scratch.get(T)
    if s is None:
        if len(state.scratch) >= SCRATCH_LENGTHS:   # chunk lengths that keep changing: bounded memory
            state.scratch.clear()
        with torch.inference_mode(False):   # plain tensors, so the state streams in and out of inference mode
            s = state.scratch[T] = StepScratch(m, b, T, x.dtype, x.device)
    x2 = x.reshape(b * T, m.d_model)
    if w.in_bias is None:
        torch.mm(x2, w.in_t, out=s.xz_out)
    else:
        torch.addmm(w.in_bias, x2, w.in_t, out=s.xz_out)
    if s.xz_copy is not None:
        s.xz_copy[0].copy_(s.xz_copy[1])
    # Causal conv over [carried tail, chunk], time-major: one multiply-add per tap over all T steps.
    s.win_head.copy_(state.conv)
    state.conv.copy_(s.win_tail)                                   # after the head: they overlap if T < K - 1
    uc = s.uc
    if w.conv_bias is None:
        torch.mul(s.taps[0], w.conv_taps[0], out=uc)
    else:
        torch.addcmul(w.conv_bias, s.taps[0], w.conv_taps[0], out=uc)
    for tap, wk in zip(s.taps[1:], w.conv_taps[1:]):
        uc.addcmul_(tap, wk)
    F.silu(uc, inplace=True)
    # Delta, B, C: x_proj into one buffer whose column views are the three; dt_proj with its bias in one mm.
    torch.mm(s.uc2, w.x_t, out=s.x_out)
    dt = torch.mm(s.dt_low, w.dt_t, out=s.dt)
    torch._C._nn.softplus(dt, 1, 20, out=dt)
    # Discretise, dA = exp(dt A) and dt u B, then the recurrence in place: H becomes the states.
    torch.mul(s.dt4, w.A_log2e, out=s.dA).exp2_()
    torch.mul(s.dt3, uc, out=s.du)
    torch.mul(s.du4, s.B4, out=s.H)
    s.H_steps[0].addcmul_(s.dA_steps[0], state.ssm)
    for t in range(1, T):
        s.H_steps[t].addcmul_(s.dA_steps[t], s.H_steps[t - 1])
    state.ssm.copy_(s.H_steps[T - 1])
    torch.bmm(s.C3, s.H3t, out=s.y)                                     # <h_t, C_t> for every step
    y = s.y3.addcmul_(uc, w.D)
    y.mul_(F.silu(s.z, inplace=True))
    if residual is not None:
        out = torch.addmm(residual.reshape(b * T, m.d_model), s.y2, w.out_t)
        if w.out_bias is not None:
            out.add_(w.out_bias)
    else:
        out = torch.mm(s.y2, w.out_t) if w.out_bias is None else torch.addmm(w.out_bias, s.y2, w.out_t)
    return out.view(b, T, m.d_model)
