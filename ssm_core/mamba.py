"""The Mamba (selective SSM) mixer, parameter-for-parameter compatible with mamba_ssm's
`mamba_ssm.modules.mamba_simple.Mamba`: a mamba_ssm block's `state_dict` loads with `strict=True` and
gives the same outputs.

Besides `forward` over a whole sequence it streams: `init_state` makes the recurrent state (the conv
tail and the SSM state, the latter in float32) and `stream` consumes chunks of any length >= 1, with
outputs equal to `forward` over the concatenated sequence.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .ops import causal_conv1d, forced_backend, mamba_inner, selective_scan, selective_state_update
from .reference import selective_inputs_ref

# Chunks up to this many steps stream step by step on the CPU (Mamba._stream_steps); longer ones go
# through the chunked scan. Both give forward's results; this only picks the faster.
STREAM_STEPS = 16
# A state keeps the step path's scratch buffers for at most this many chunk lengths (a live source may
# alternate between a few, e.g. 2 and 3 frames).
SCRATCH_LENGTHS = 4
LOG2E = math.log2(math.e)   # exp(x) = exp2(x log2 e); exp2 is the cheaper op on a CPU


def _records_grad(x: torch.Tensor, module: nn.Module) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or module.A_log.requires_grad)


@dataclass
class MambaState:
    """Recurrent state of one Mamba mixer. Tensors are updated in place by `Mamba.stream`."""
    conv: torch.Tensor  # (batch, d_inner, d_conv - 1): the last inputs of the causal conv
    ssm: torch.Tensor   # (batch, d_inner, d_state), float32
    # Scratch buffers of the CPU short-chunk path, one set per chunk length, made on first use. Not state:
    # every element is written before it is read, so copies of a state may share or drop them.
    scratch: dict = field(default_factory=dict, repr=False, compare=False)


class _StepWeights:
    """`Mamba`'s weights laid out for `_stream_steps` (see `Mamba._stream_weights` for when they are remade):
    transposed views for the matmuls, the conv taps as K (d_inner,) rows, A log2(e) for exp2, x_proj and
    dt_proj rearranged so that dt_proj's bias rides in its matmul."""

    def __init__(self, m: Mamba, params: tuple, key: tuple):
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
        # with a column of ones after dt_low (see _StepScratch.x_dbl), dt_proj and its bias are one matmul.
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


class _StepScratch:
    """The buffers of `_stream_steps` for (batch, T) and the views it uses, made once: the hot path
    then only indexes attributes."""

    def __init__(self, m: Mamba, b: int, T: int, dtype: torch.dtype, device):
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
        # x_proj output as [B, C, dt_low, 1]: the trailing ones multiply dt_proj's bias row (_StepWeights).
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


class Mamba(nn.Module):
    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2, dt_rank="auto",
                 dt_min: float = 0.001, dt_max: float = 0.1, dt_init: str = "random", dt_scale: float = 1.0,
                 dt_init_floor: float = 1e-4, conv_bias: bool = True, bias: bool = False,
                 selective: bool = True, layer_idx: int | None = None, device=None, dtype=None):
        super().__init__()
        for name, v in (("d_model", d_model), ("d_state", d_state), ("d_conv", d_conv), ("expand", expand)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive integer, got {v!r}")
        if dt_init not in ("random", "constant"):
            raise ValueError(f"dt_init: expected 'random' or 'constant', got {dt_init!r}")
        fk = {"device": device, "dtype": dtype}
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.selective = selective
        self.layer_idx = layer_idx

        self.in_proj = nn.Linear(d_model, self.d_inner * 2, bias=bias, **fk)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, kernel_size=d_conv, groups=self.d_inner,
                                padding=d_conv - 1, bias=conv_bias, **fk)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True, **fk)
        if selective:
            # Delta, B and C are functions of the input: the "selection" mechanism.
            self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False, **fk)
        else:
            # Time-invariant ablation (S4D-like): Delta = softplus(dt_proj.bias) per channel, B and C are
            # learned constants shared by the channels. Same scan, no dependence on the input.
            self.B_lti = nn.Parameter(torch.randn(d_state, **fk) / math.sqrt(d_state))
            self.C_lti = nn.Parameter(torch.randn(d_state, **fk) / math.sqrt(d_state))

        # Initialisation exactly as mamba_ssm: dt_proj keeps the variance of its input, and its bias is the
        # inverse softplus of dt ~ LogUniform(dt_min, dt_max), so softplus(bias) starts in that range.
        dt_init_std = self.dt_rank ** -0.5 * dt_scale
        if dt_init == "constant":
            nn.init.constant_(self.dt_proj.weight, dt_init_std)
        else:
            nn.init.uniform_(self.dt_proj.weight, -dt_init_std, dt_init_std)
        dt = torch.exp(torch.rand(self.d_inner, **fk) * (math.log(dt_max) - math.log(dt_min))
                       + math.log(dt_min)).clamp(min=dt_init_floor)
        inv_dt = dt + torch.log(-torch.expm1(-dt))
        with torch.no_grad():
            self.dt_proj.bias.copy_(inv_dt)
        self.dt_proj.bias._no_reinit = True
        # S4D-Real initialisation A = -(1..N), stored as log for positivity.
        A = torch.arange(1, d_state + 1, dtype=torch.float32, device=device).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(self.d_inner, device=device))
        self.D._no_weight_decay = True
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **fk)

    # --- pieces shared by forward and stream -------------------------------------------------------
    def _conv_weight(self) -> torch.Tensor:
        return self.conv1d.weight.squeeze(1)  # (d_inner, d_conv)

    def _ssm_inputs(self, x: torch.Tensor):
        """x (batch, d_inner, L) after the conv -> (delta before bias, B, C) as the scan wants them."""
        b, _, L = x.shape
        if self.selective:
            return selective_inputs_ref(x, self.x_proj.weight, self.dt_proj.weight)
        delta = x.new_zeros(b, self.d_inner, L)
        B = self.B_lti.to(x.dtype)[None, :, None].expand(b, -1, L)
        C = self.C_lti.to(x.dtype)[None, :, None].expand(b, -1, L)
        return delta, B, C

    def _check_input(self, x: torch.Tensor, name: str = "x") -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.d_model:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name}: expected shape (batch, L, d_model={self.d_model}), got {got}")
        if not x.is_floating_point():
            raise ValueError(f"{name}: expected a floating-point tensor, got {x.dtype}")
        if x.shape[1] < 1:
            raise ValueError(f"{name}: sequence length must be >= 1")

    # --- full sequence --------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, norm: nn.Module | None = None) -> torch.Tensor:
        """x (batch, L, d_model) -> (batch, L, d_model). Given `norm` (the block's pre-norm, an RMSNorm with
        `weight` and `eps`), x is the residual stream and the result x + mixer(norm(x)): for the selective
        mixer one fused function that saves the stream but not its normalised copy (training memory)."""
        self._check_input(x)
        if norm is not None and not self.selective:
            return x + self(norm(x, out_dtype=norm.weight.dtype))
        A = -torch.exp(self.A_log.float())
        if self.selective:
            nw, eps = (None, 1e-5) if norm is None else (norm.weight, norm.eps)
            return mamba_inner(x, self.in_proj.weight, self.in_proj.bias, self._conv_weight(), self.conv1d.bias,
                               self.x_proj.weight, self.dt_proj.weight, self.dt_proj.bias, A, self.D.float(),
                               self.out_proj.weight, self.out_proj.bias, norm_weight=nw, norm_eps=eps)
        xz = self.in_proj(x).transpose(1, 2)                           # (b, 2*d_inner, L)
        u, z = xz.chunk(2, dim=1)
        u = causal_conv1d(u, self._conv_weight(), self.conv1d.bias, activation="silu")
        delta, B, C = self._ssm_inputs(u)
        y = selective_scan(u, delta, A, B, C, D=self.D.float(), z=z, delta_bias=self.dt_proj.bias.float(),
                           delta_softplus=True)
        return self.out_proj(y.transpose(1, 2))

    def _A(self) -> torch.Tensor:
        """A = -exp(A_log) in float32. Without autograd (inference streaming) it is cached until A_log
        changes (`params_key`), saving two ops on every streamed chunk."""
        key = None if torch.is_grad_enabled() else params_key([self.A_log])
        if key is None:
            return -torch.exp(self.A_log.float())
        cache = self.__dict__.get("_A_cache")
        if cache is None or cache[0] != key:
            with torch.inference_mode(False):   # a normal tensor: usable outside inference mode too
                # The cache holds A_log itself, so no new tensor can take its address while it is kept.
                A_log = self.A_log.detach()
                cache = self.__dict__["_A_cache"] = (key, -torch.exp(A_log.float()), A_log)
        return cache[1]

    # --- streaming --------------------------------------------------------------------------------------
    def init_state(self, batch_size: int, device=None, dtype=None) -> MambaState:
        p = self.in_proj.weight
        device = device if device is not None else p.device
        dtype = dtype if dtype is not None else p.dtype
        return MambaState(conv=torch.zeros(batch_size, self.d_inner, self.d_conv - 1, device=device, dtype=dtype),
                          ssm=torch.zeros(batch_size, self.d_inner, self.d_state, device=device,
                                          dtype=torch.float64 if dtype == torch.float64 else torch.float32))

    def stream(self, x: torch.Tensor, state: MambaState,
               residual: torch.Tensor | None = None) -> tuple[torch.Tensor, MambaState]:
        """Consume a chunk x (batch, T, d_model), T >= 1, continuing from `state` (updated in place).
        Returns (y, state) with y equal to the matching slice of `forward` over the whole stream; given a
        `residual` (batch, T, d_model), returns residual + y instead (a backbone's residual stream: on the
        CPU step path the add rides in out_proj's matmul)."""
        self._check_input(x)
        if state.ssm.shape[0] != x.shape[0]:
            raise ValueError(f"state: built for batch {state.ssm.shape[0]}, got x with batch {x.shape[0]}")
        if residual is not None and residual.shape != x.shape:
            raise ValueError(f"residual: expected shape {tuple(x.shape)}, got {tuple(residual.shape)}")
        T = x.shape[1]
        w = self._step_weights(x, state, residual) if T <= STREAM_STEPS else None
        if w is not None:
            return self._stream_steps(x, state, residual, w), state
        xz = self.in_proj(x)                                            # (b, T, 2*d_inner)
        A = self._A()
        if T == 1 and self.selective:
            u, z = xz[:, 0].chunk(2, dim=-1)
            y = self._step(u, z, A, state).unsqueeze(1)
        else:
            u, z = xz.transpose(1, 2).chunk(2, dim=1)
            u, tail = causal_conv1d(u, self._conv_weight(), self.conv1d.bias, initial_states=state.conv,
                                    return_final_states=True, activation="silu")
            state.conv.copy_(tail)
            delta, B, C = self._ssm_inputs(u)
            y, h = selective_scan(u, delta, A, B, C, D=self.D.float(), z=z, delta_bias=self.dt_proj.bias.float(),
                                  delta_softplus=True, h0=state.ssm, return_final_state=True)
            state.ssm.copy_(h)
            y = y.transpose(1, 2)
        y = self.out_proj(y)
        return (y if residual is None else residual + y), state

    def _step_weights(self, x: torch.Tensor, state: MambaState, residual: torch.Tensor | None) -> _StepWeights | None:
        """The weights for `_stream_steps` if it takes this chunk, else None. It takes: CPU tensors, the
        selective SSM, autograd off (it writes buffers in place, which autograd cannot record: streaming for
        training, e.g. truncated BPTT, takes the chunked scan, whose autograd.Function can), no autocast, the
        "cpu" backend (not forced to the reference), and one dtype throughout (float32 or float64: parameters,
        input, state and residual; half types take the general path, which computes the SSM in float32).
        Cheap checks first, and no nn.Module attribute lookups (~1.5 us each): this runs on every chunk."""
        # For a CPU tensor `backend_for` is "cpu" unless SSM_CORE_BACKEND forces another backend; asking
        # `forced_backend` alone skips its import check of ssm_core.cpu (~2 us), which this path does not use.
        if (not self.selective or not x.is_cpu or _records_grad(x, self) or torch.is_autocast_enabled("cpu")
                or forced_backend() != "auto"):
            return None
        w = self._stream_weights()
        dtype = x.dtype
        if w.dtype == dtype == state.ssm.dtype == state.conv.dtype and (residual is None or residual.dtype == dtype):
            return w
        return None

    def _stream_weights(self) -> _StepWeights:
        """The weights of `_stream_steps` in the layout it wants, made once and kept until a parameter
        changes (`params_key` of all of them)."""
        # Read from the modules' parameter dicts each call (~3 us): a replaced parameter or submodule is seen.
        params = [p for mod in (self, *self._modules.values()) for p in mod._parameters.values() if p is not None]
        key = params_key(params)
        cache = self.__dict__.get("_stream_cache")
        if key is None or cache is None or cache.key != key:
            with torch.no_grad(), torch.inference_mode(False):   # plain tensors, usable outside inference mode
                cache = _StepWeights(self, params, key)
            if key is not None:
                self.__dict__["_stream_cache"] = cache
        return cache

    def _stream_steps(self, x: torch.Tensor, state: MambaState, residual: torch.Tensor | None,
                      w: _StepWeights) -> torch.Tensor:
        """A short chunk on the CPU (e.g. a 20 ms audio chunk, 2 frames): the streaming hot path. At this
        size per-op dispatch, not FLOPs, is the cost, so everything but the state recurrence (one fused op
        a step) is vectorised over the T steps, every intermediate is written into scratch buffers kept in
        the state (no allocation per call but the returned output), the views of those buffers are made
        once, and the weights come pre-laid-out from `_stream_weights`. Same arithmetic as `forward` but
        exp(dt A) computed as exp2(dt A log2 e), which is ~2x faster here. x (b, T, d_model) -> y
        (plus `residual` if given); `w` from `_step_weights`."""
        b, T, _ = x.shape
        s = state.scratch.get(T)
        if s is None:
            if len(state.scratch) >= SCRATCH_LENGTHS:   # chunk lengths that keep changing: bounded memory
                state.scratch.clear()
            with torch.inference_mode(False):   # plain tensors, so the state streams in and out of inference mode
                s = state.scratch[T] = _StepScratch(self, b, T, x.dtype, x.device)
        x2 = x.reshape(b * T, self.d_model)
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
            out = torch.addmm(residual.reshape(b * T, self.d_model), s.y2, w.out_t)
            if w.out_bias is not None:
                out.add_(w.out_bias)
        else:
            out = torch.mm(s.y2, w.out_t) if w.out_bias is None else torch.addmm(w.out_bias, s.y2, w.out_t)
        return out.view(b, T, self.d_model)

    def _step(self, u: torch.Tensor, z: torch.Tensor, A: torch.Tensor, state: MambaState) -> torch.Tensor:
        """One token: u, z (batch, d_inner). The conv is a dot product with the rolled tail."""
        w = self._conv_weight()
        window = torch.cat([state.conv, u.unsqueeze(-1).to(state.conv.dtype)], dim=-1)   # (b, d_inner, K)
        state.conv.copy_(window[:, :, 1:])
        uc = (window * w.to(window.dtype)).sum(-1)
        if self.conv1d.bias is not None:
            uc = uc + self.conv1d.bias.to(uc.dtype)
        uc = F.silu(uc).to(u.dtype)
        x_dbl = self.x_proj(uc)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = dt @ self.dt_proj.weight.t()
        return selective_state_update(state.ssm, uc, dt, A, B, C, D=self.D.float(), z=z,
                                      dt_bias=self.dt_proj.bias.float(), dt_softplus=True)
