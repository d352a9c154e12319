"""The fast CPU path: `selective_scan` with the exact signature and semantics of `selective_scan_ref`.
`ssm_core.ops` sends CPU tensors here. `causal_conv1d` and `selective_state_update` are deliberately not
overridden: their references are already one `F.conv1d` / a handful of ops, and the streaming hot path
(`Mamba._stream_steps`) fuses both into its own few ops.

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
"""
from __future__ import annotations

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
