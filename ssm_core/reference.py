"""Pure-PyTorch reference of every op: the ground truth that `kernels/` (Triton) and the fast CPU path
are tested against. Written for clarity, computed in float32 (or float64 when given float64), and
with bounded memory: the (batch, dim, L, N) state history is never held, only one chunk of it.

Shapes follow mamba_ssm's `selective_scan_fn`:
    u, delta, z: (batch, dim, L)      A: (dim, N)      D, delta_bias: (dim,)
    B, C: (batch, N, L) or grouped (batch, G, N, L) with dim % G == 0
    h0 and the final state: (batch, dim, N), float32
Mamba-2's chunked SSD (`ssd_chunk_scan_ref`) takes mamba_ssm's `mamba_chunk_scan_combined` layout instead.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Steps whose discretised (batch, dim, T, N) tensors are materialised at once. Bounds the reference's
# memory for long L; the result does not depend on it.
REF_CHUNK = 256


def _expect(name: str, t: torch.Tensor | None, shape: tuple, optional: bool = False) -> None:
    if t is None:
        if optional:
            return
        raise ValueError(f"{name}: expected a tensor of shape {shape}, got None")
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor of shape {shape}, got {type(t).__name__}")
    if not t.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor, got dtype {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")


def check_scan_inputs(u, delta, A, B, C, D=None, z=None, delta_bias=None, h0=None) -> tuple[int, int, int, int, int]:
    """Validate selective-scan arguments; returns (batch, dim, L, N, groups). Raises ValueError naming the
    offending argument and the shape it should have."""
    if not isinstance(u, torch.Tensor) or u.dim() != 3:
        got = tuple(u.shape) if isinstance(u, torch.Tensor) else type(u).__name__
        raise ValueError(f"u: expected shape (batch, dim, L), got {got}")
    b, d, L = u.shape
    if L < 1:
        raise ValueError("u: sequence length L must be >= 1")
    _expect("u", u, (b, d, L))
    _expect("delta", delta, (b, d, L))
    if not isinstance(A, torch.Tensor) or A.dim() != 2 or A.shape[0] != d:
        got = tuple(A.shape) if isinstance(A, torch.Tensor) else type(A).__name__
        raise ValueError(f"A: expected shape (dim={d}, N), got {got}")
    n = A.shape[1]
    _expect("A", A, (d, n))
    if not isinstance(B, torch.Tensor) or B.dim() not in (3, 4):
        raise ValueError(f"B: expected shape (batch={b}, N={n}, L={L}) or (batch, G, N, L)")
    g = 1 if B.dim() == 3 else B.shape[1]
    if g < 1 or d % g:
        raise ValueError(f"B: number of groups G={g} must divide dim={d}")
    bc_shape = (b, n, L) if B.dim() == 3 else (b, g, n, L)
    _expect("B", B, bc_shape)
    _expect("C", C, bc_shape)
    _expect("D", D, (d,), optional=True)
    _expect("z", z, (b, d, L), optional=True)
    _expect("delta_bias", delta_bias, (d,), optional=True)
    _expect("h0", h0, (b, d, n), optional=True)
    return b, d, L, n, g


def _per_channel(X: torch.Tensor, d: int) -> torch.Tensor:
    """(batch, N, T) or grouped (batch, G, N, T) -> (batch, dim, N, T) view/gather, one group per channel."""
    if X.dim() == 3:
        return X.unsqueeze(1)  # broadcasts over dim
    g = X.shape[1]
    return X.repeat_interleave(d // g, dim=1)


def scan_step_sizes(u, delta, delta_bias=None, delta_softplus=False):
    """Compute dtype (float32, or float64 for float64 input), u in it, and the step sizes
    dt = softplus(delta + delta_bias) (softplus only if asked): the scan's first stage, shared by backends."""
    ct = torch.float64 if u.dtype == torch.float64 else torch.float32
    uf, dt = u.to(ct), delta.to(ct)
    if delta_bias is not None:
        dt = dt + delta_bias.to(ct)[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    return ct, uf, dt


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       h0=None, return_final_state=False):
    """The Mamba-1 selective scan, step by step:

        dt_t = softplus(delta_t + delta_bias)        (softplus only if delta_softplus)
        h_t  = exp(dt_t * A) * h_{t-1} + dt_t * B_t * u_t
        y_t  = <h_t, C_t> + D * u_t,   then  y_t *= silu(z_t)

    Returns y in u's dtype, and the final state (batch, dim, N) in float32 (float64 for float64 input)
    when `return_final_state`. Differentiable in every input, h0 and the final state included.
    """
    b, d, L, n, _ = check_scan_inputs(u, delta, A, B, C, D, z, delta_bias, h0)
    out_dtype = u.dtype
    ct, uf, dt = scan_step_sizes(u, delta, delta_bias, delta_softplus)
    Af, Bf, Cf = A.to(ct), B.to(ct), C.to(ct)
    h = h0.to(ct) if h0 is not None else uf.new_zeros(b, d, n)
    ys = []
    for s in range(0, L, REF_CHUNK):
        e = min(L, s + REF_CHUNK)
        dt_c = dt[:, :, s:e]                                       # (b, d, T)
        dA = torch.exp(dt_c.unsqueeze(-1) * Af[:, None, :])        # (b, d, T, n)
        Bc = _per_channel(Bf[..., s:e], d).transpose(-1, -2)       # (b, d|1, T, n)
        Cc = _per_channel(Cf[..., s:e], d).transpose(-1, -2)
        dBu = (dt_c * uf[:, :, s:e]).unsqueeze(-1) * Bc            # (b, d, T, n)
        for t in range(e - s):
            h = dA[:, :, t] * h + dBu[:, :, t]
            ys.append((h * Cc[:, :, t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + uf * D.to(ct)[:, None]
    if z is not None:
        y = y * F.silu(z.to(ct))
    y = y.to(out_dtype)
    return (y, h) if return_final_state else y


def causal_conv1d_ref(x, weight, bias=None, initial_states=None, return_final_states=False, activation=None):
    """Depthwise causal convolution: x (batch, dim, L), weight (dim, K), bias (dim,).

    `initial_states` (batch, dim, K-1) are the K-1 inputs that preceded x (zeros when None); with
    `return_final_states` the last K-1 inputs (the tail to carry into the next chunk) are returned too.
    `activation` is None or "silu"."""
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ValueError("x: expected shape (batch, dim, L)")
    b, d, L = x.shape
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[0] != d:
        got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"weight: expected shape (dim={d}, K), got {got}")
    k = weight.shape[1]
    _expect("bias", bias, (d,), optional=True)
    _expect("initial_states", initial_states, (b, d, k - 1), optional=True)
    if activation not in (None, "silu"):
        raise ValueError(f"activation: expected None or 'silu', got {activation!r}")
    if initial_states is None:
        initial_states = x.new_zeros(b, d, k - 1)
    xx = torch.cat([initial_states.to(x.dtype), x], dim=-1)
    out = F.conv1d(xx, weight.unsqueeze(1).to(x.dtype), None if bias is None else bias.to(x.dtype), groups=d)
    if activation == "silu":
        out = F.silu(out)
    if return_final_states:
        return out, xx[:, :, xx.shape[-1] - (k - 1):]
    return out


def selective_state_update_ref(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """One recurrent step of the selective SSM, updating `state` (batch, dim, N) in place.
    x, dt, z: (batch, dim); B, C: (batch, N) or grouped (batch, G, N). Returns y (batch, dim) in x's dtype."""
    if not isinstance(state, torch.Tensor) or state.dim() != 3:
        raise ValueError("state: expected shape (batch, dim, N)")
    b, d, n = state.shape
    _expect("x", x, (b, d))
    _expect("dt", dt, (b, d))
    _expect("A", A, (d, n))
    g = 1 if B.dim() == 2 else B.shape[1]
    bc_shape = (b, n) if B.dim() == 2 else (b, g, n)
    _expect("B", B, bc_shape)
    _expect("C", C, bc_shape)
    _expect("D", D, (d,), optional=True)
    _expect("z", z, (b, d), optional=True)
    _expect("dt_bias", dt_bias, (d,), optional=True)
    ct = state.dtype
    dtf = dt.to(ct)
    if dt_bias is not None:
        dtf = dtf + dt_bias.to(ct)
    if dt_softplus:
        dtf = F.softplus(dtf)
    Bd = B.to(ct).unsqueeze(1) if B.dim() == 2 else B.to(ct).repeat_interleave(d // g, dim=1)
    Cd = C.to(ct).unsqueeze(1) if C.dim() == 2 else C.to(ct).repeat_interleave(d // g, dim=1)
    xf = x.to(ct)
    dA = torch.exp(dtf.unsqueeze(-1) * A.to(ct))
    state.copy_(dA * state + (dtf * xf).unsqueeze(-1) * Bd)
    y = (state * Cd).sum(-1)
    if D is not None:
        y = y + xf * D.to(ct)
    if z is not None:
        y = y * F.silu(z.to(ct))
    return y.to(x.dtype)


def selective_inputs_ref(u, x_proj_weight, dt_proj_weight):
    """The selection: u (batch, d_inner, L) after the conv -> (delta without dt_proj's bias, B, C) in the
    scan's layout. x_proj_weight (dt_rank + 2N, d_inner), dt_proj_weight (d_inner, dt_rank)."""
    r = dt_proj_weight.shape[1]
    n = (x_proj_weight.shape[0] - r) // 2
    x_dbl = F.linear(u.transpose(1, 2), x_proj_weight)                   # (b, L, r + 2N)
    dt, B, C = torch.split(x_dbl, [r, n, n], dim=-1)
    delta = (dt @ dt_proj_weight.t()).transpose(1, 2)                    # the bias is added inside the scan
    return delta, B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous()


def mamba_inner_ref(x, in_proj_weight, in_proj_bias, conv_weight, conv_bias, x_proj_weight, dt_proj_weight,
                    dt_proj_bias, A, D, out_proj_weight, out_proj_bias=None, norm_weight=None, norm_eps=1e-5,
                    scan=None, conv=None, norm=None):
    """The selective Mamba block from its parameters (mamba_ssm's `mamba_inner_ref`): x (batch, L, d_model)
    -> in_proj -> (u, z); u = silu(causal conv(u)); (dt, B, C) = x_proj(u); delta = dt_proj(dt) without
    its bias (the scan adds it before the softplus); y = scan(...) gated by silu(z); out_proj(y).
    With `norm_weight`, the pre-norm residual block: x is the residual stream and the result
    x + inner(rms_norm(x, norm_weight, norm_eps) in norm_weight's dtype), promoted.
    `scan`, `conv` and `norm` default to this module's ops (the CPU dispatch passes its faster ones)."""
    if norm_weight is not None:
        h = (norm or rms_norm_ref)(x, norm_weight, norm_eps, norm_weight.dtype)
        return x + mamba_inner_ref(h, in_proj_weight, in_proj_bias, conv_weight, conv_bias, x_proj_weight,
                                   dt_proj_weight, dt_proj_bias, A, D, out_proj_weight, out_proj_bias,
                                   scan=scan, conv=conv)
    scan = scan or selective_scan_ref
    conv = conv or causal_conv1d_ref
    xz = F.linear(x, in_proj_weight, in_proj_bias).transpose(1, 2)        # (b, 2 d_in, L)
    u, z = xz.chunk(2, dim=1)
    u = conv(u, conv_weight, conv_bias, activation="silu")
    delta, B, C = selective_inputs_ref(u, x_proj_weight, dt_proj_weight)
    y = scan(u, delta, A, B, C, D=D, z=z, delta_bias=dt_proj_bias.float(), delta_softplus=True)
    return F.linear(y.transpose(1, 2), out_proj_weight, out_proj_bias)


def rms_norm_ref(x, weight, eps=1e-5, out_dtype=None):
    """y = x / sqrt(mean(x^2) + eps) * weight over the last axis, computed in float32 (float64 stays float64)
    and returned in out_dtype (default x's dtype)."""
    xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.to(xf.dtype)).to(out_dtype or x.dtype)


# --- Mamba-2: the chunked SSD ------------------------------------------------------------------------
def check_ssd_inputs(x, dt, A, B, C, D=None, z=None, dt_bias=None, initial_states=None):
    """Validate SSD arguments (mamba_chunk_scan_combined layout); returns (batch, L, heads, headdim, groups, N)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError("x: expected shape (batch, L, nheads, headdim)")
    b, L, h, p = x.shape
    if L < 1:
        raise ValueError("x: sequence length L must be >= 1")
    if not isinstance(B, torch.Tensor) or B.dim() != 4 or B.shape[:2] != (b, L):
        raise ValueError(f"B: expected shape (batch={b}, L={L}, ngroups, d_state)")
    g, n = B.shape[2:]
    if h % g:
        raise ValueError(f"B: ngroups={g} must divide nheads={h}")
    shapes = {"dt": (dt, (b, L, h)), "A": (A, (h,)), "C": (C, (b, L, g, n)), "z": (z, (b, L, h, p)),
              "dt_bias": (dt_bias, (h,)), "initial_states": (initial_states, (b, h, p, n))}
    for name, (t, shape) in shapes.items():
        if t is None and name in ("dt", "A", "C"):
            raise ValueError(f"{name}: expected a tensor of shape {shape}, got None")
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")
    if D is not None and tuple(D.shape) not in ((h,), (h, p)):
        raise ValueError(f"D: expected shape ({h},) or ({h}, {p}), got {tuple(D.shape)}")
    return b, L, h, p, g, n


def _segsum_exp(cs: torch.Tensor) -> torch.Tensor:
    """cs (..., Q) cumulative log-decays -> (..., Q, Q) with [i, j] = exp(cs_i - cs_j) for j <= i, else 0."""
    Q = cs.shape[-1]
    diff = cs[..., :, None] - cs[..., None, :]
    causal = torch.ones(Q, Q, dtype=torch.bool, device=cs.device).tril()
    return torch.exp(diff.masked_fill(~causal, -math.inf))


def ssd_chunk_scan_ref(x, dt, A, B, C, chunk_size: int = 256, D=None, z=None, dt_bias=None,
                       dt_softplus: bool = False, initial_states=None, return_final_states: bool = False):
    """Chunked SSD in plain PyTorch, computed in float32 (float64 for float64 input).

        x (batch, L, nheads, headdim)   dt (batch, L, nheads)   A (nheads,)
        B, C (batch, L, ngroups, d_state)   D (nheads,) or (nheads, headdim)   z like x (y *= silu(z))
        dt_bias (nheads,)   initial_states / final state (batch, nheads, headdim, d_state)

    Returns y like x (in x's dtype), and the final state in float32 (float64) when `return_final_states`.
    The result does not depend on `chunk_size` (up to rounding); L need not be a multiple of it.
    """
    b, L, h, p, g, n = check_ssd_inputs(x, dt, A, B, C, D, z, dt_bias, initial_states)
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    dt = dt.to(ct)
    if dt_bias is not None:
        dt = dt + dt_bias.to(ct)
    if dt_softplus:
        dt = F.softplus(dt)
    Q = max(1, min(int(chunk_size), L))
    pad = (-L) % Q
    # Padding steps get dt = 0: decay exp(0) = 1 and no input, so the final state is unchanged.
    xf, Bf, Cf = (F.pad(t.to(ct), (0, 0, 0, 0, 0, pad)) for t in (x, B, C))
    dt = F.pad(dt, (0, 0, 0, pad))
    nc = (L + pad) // Q
    xc = xf.view(b, nc, Q, h, p)
    Bc = Bf.view(b, nc, Q, g, n).repeat_interleave(h // g, dim=3)      # (b, c, Q, h, n)
    Cc = Cf.view(b, nc, Q, g, n).repeat_interleave(h // g, dim=3)
    dtc = dt.view(b, nc, Q, h)
    cs = torch.cumsum((dtc * A.to(ct)).permute(0, 3, 1, 2), dim=-1)    # (b, h, c, Q)

    # 1. within each chunk: the masked "attention" form (quadratic in Q).
    Lmat = _segsum_exp(cs)                                               # (b, h, c, Q, Q)
    scores = torch.einsum("bclhn,bcshn->bhcls", Cc, Bc) * Lmat
    y = torch.einsum("bhcls,bcsh,bcshp->bclhp", scores, dtc, xc)
    # 2. each chunk's own contribution to the state at its end.
    decay_to_end = torch.exp(cs[..., -1:] - cs)                          # (b, h, c, Q)
    chunk_states = torch.einsum("bclhn,bhcl,bclh,bclhp->bchpn", Bc, decay_to_end, dtc, xc)
    # 3. across chunks: a linear recurrence over the (P, N) states only.
    state = (initial_states.to(ct) if initial_states is not None else xf.new_zeros(b, h, p, n))
    chunk_decay = torch.exp(cs[..., -1])                                 # (b, h, c)
    starts = []
    for c in range(nc):
        starts.append(state)
        state = chunk_decay[:, :, c, None, None] * state + chunk_states[:, c]
    starts = torch.stack(starts, dim=1)                                  # (b, c, h, p, n)
    # 4. the incoming state's contribution to each output.
    y = y + torch.einsum("bclhn,bchpn,bhcl->bclhp", Cc, starts, torch.exp(cs))
    y = y.reshape(b, nc * Q, h, p)[:, :L]
    if D is not None:
        Dd = D.to(ct)
        y = y + xf[:, :L] * (Dd[:, None] if Dd.dim() == 1 else Dd)
    if z is not None:
        y = y * F.silu(z.to(ct))
    y = y.to(x.dtype)
    return (y, state) if return_final_states else y
