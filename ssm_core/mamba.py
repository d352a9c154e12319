"""The Mamba (selective SSM) mixer, parameter-for-parameter compatible with mamba_ssm's
`mamba_ssm.modules.mamba_simple.Mamba`: a mamba_ssm block's `state_dict` loads with `strict=True` and
gives the same outputs.

Besides `forward` over a whole sequence it streams: `init_state` makes the recurrent state (the conv
tail and the SSM state, the latter in float32) and `stream` consumes chunks of any length >= 1, with
outputs equal to `forward` over the concatenated sequence. Short CPU chunks take the step path of
`ssm_core.cpu.stream_steps`; everything else goes through the ops of `ssm_core.ops`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import cpu
from .cpu import params_key
from .ops import causal_conv1d, forced_backend, mamba_inner, selective_scan, selective_state_update
from .reference import selective_inputs_ref


def _records_grad(x: torch.Tensor, module: nn.Module) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or module.A_log.requires_grad)


def carry_state(state, name: str, value: torch.Tensor) -> None:
    """Store a chunk's final `value` as `state.<name>`: written into the existing tensor (no allocation per
    chunk), or, while autograd records (training through `stream`: state passing, truncated BPTT), put in its
    place as a new tensor, because the chunk's ops may have saved the old one for their backward."""
    old = getattr(state, name)
    if value.requires_grad:
        setattr(state, name, value.to(old.dtype))
    else:
        old.copy_(value)


@dataclass
class MambaState:
    """Recurrent state of one Mamba mixer. Tensors are updated in place by `Mamba.stream` (replaced, while
    autograd records: `carry_state`)."""
    conv: torch.Tensor  # (batch, d_inner, d_conv - 1): the last inputs of the causal conv
    ssm: torch.Tensor   # (batch, d_inner, d_state), float32
    # Scratch buffers of the CPU short-chunk path (ssm_core.cpu.stream_steps), one set per chunk length, made
    # on first use. Not state: every element is written before it is read, so copies of a state may share
    # or drop them.
    scratch: dict = field(default_factory=dict, repr=False, compare=False)


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
    def scan_inputs(self, x: torch.Tensor):
        """x (batch, L, d_model) -> (u, z, delta before bias, B, C): what the scan of a whole sequence starting
        from a zero state takes (u and z (batch, d_inner, L)); the unfused path, and for reading Delta."""
        u, z = self.in_proj(x).transpose(1, 2).chunk(2, dim=1)         # (b, d_inner, L) each
        u = causal_conv1d(u, self._conv_weight(), self.conv1d.bias, activation="silu")
        return (u, z, *self._ssm_inputs(u))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (batch, L, d_model) -> (batch, L, d_model)."""
        self._check_input(x)
        if self.selective:
            return self._fused(x)
        A = -torch.exp(self.A_log.float())
        u, z, delta, B, C = self.scan_inputs(x)
        y = selective_scan(u, delta, A, B, C, D=self.D.float(), z=z, delta_bias=self.dt_proj.bias.float(),
                           delta_softplus=True)
        return self.out_proj(y.transpose(1, 2))

    def residual_forward(self, residual: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        """The pre-norm residual block around this mixer: residual + mixer(norm(residual)), with `residual`
        (batch, L, d_model) the residual stream and `norm` the block's RMSNorm (`weight`, `eps`). For the
        selective mixer one fused function that saves the stream but not its normalised copy (training
        memory); the mixer runs in norm.weight's dtype, the add in the stream's."""
        self._check_input(residual)
        if self.selective:
            return self._fused(residual, norm)
        return residual + self(norm(residual, out_dtype=norm.weight.dtype))

    def _fused(self, x: torch.Tensor, norm: nn.Module | None = None) -> torch.Tensor:
        """The selective mixer as one `mamba_inner` call (with `norm`: the pre-norm residual block)."""
        nw, eps = (None, 1e-5) if norm is None else (norm.weight, norm.eps)
        return mamba_inner(x, self.in_proj.weight, self.in_proj.bias, self._conv_weight(), self.conv1d.bias,
                           self.x_proj.weight, self.dt_proj.weight, self.dt_proj.bias, -torch.exp(self.A_log.float()),
                           self.D.float(), self.out_proj.weight, self.out_proj.bias, norm_weight=nw, norm_eps=eps)

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
        w = self._step_weights(x, state, residual) if T <= cpu.STREAM_STEPS else None
        if w is not None:
            return cpu.stream_steps(self, x, state, residual, w), state
        xz = self.in_proj(x)                                            # (b, T, 2*d_inner)
        A = self._A()
        if T == 1 and self.selective:
            u, z = xz[:, 0].chunk(2, dim=-1)
            y = self._step(u, z, A, state).unsqueeze(1)
        else:
            u, z = xz.transpose(1, 2).chunk(2, dim=1)
            u, tail = causal_conv1d(u, self._conv_weight(), self.conv1d.bias, initial_states=state.conv,
                                    return_final_states=True, activation="silu")
            carry_state(state, "conv", tail)
            delta, B, C = self._ssm_inputs(u)
            y, h = selective_scan(u, delta, A, B, C, D=self.D.float(), z=z, delta_bias=self.dt_proj.bias.float(),
                                  delta_softplus=True, h0=state.ssm, return_final_state=True)
            carry_state(state, "ssm", h)
            y = y.transpose(1, 2)
        y = self.out_proj(y)
        return (y if residual is None else residual + y), state

    def _step_weights(self, x: torch.Tensor, state: MambaState,
                      residual: torch.Tensor | None) -> cpu.StepWeights | None:
        """The weights for `cpu.stream_steps` if it takes this chunk, else None. It takes: CPU tensors, the
        selective SSM, autograd off (it writes buffers in place, which autograd cannot record: streaming for
        training, e.g. truncated BPTT, takes the chunked scan, whose autograd.Function can), no autocast, the
        "cpu" backend (not forced to the reference), and one dtype throughout (float32 or float64: parameters,
        input, state and residual; half types take the general path, which computes the SSM in float32).
        Cheap checks first, and no nn.Module attribute lookups (~1.5 us each): this runs on every chunk."""
        # For a CPU tensor `backend_for` is "cpu" unless SSM_CORE_BACKEND forces another backend, so asking
        # `forced_backend` alone suffices (and skips backend_for's device checks on this hot path).
        if (not self.selective or not x.is_cpu or _records_grad(x, self) or torch.is_autocast_enabled("cpu")
                or forced_backend() != "auto"):
            return None
        w = cpu.stream_weights(self)
        dtype = x.dtype
        if w.dtype == dtype == state.ssm.dtype == state.conv.dtype and (residual is None or residual.dtype == dtype):
            return w
        return None

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
