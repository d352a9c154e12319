"""Mamba-2: the SSD (state space duality) mixer, parameter-compatible with mamba_ssm's
`mamba_ssm.modules.mamba2.Mamba2` (`in_proj`, `conv1d`, `dt_bias`, `A_log`, `D`, `norm`, `out_proj`).

The SSM of Mamba-2 is Mamba's with a scalar decay per head: for head h with state (headdim P, d_state N)

    dt_t = softplus(dt_raw_t + dt_bias)         a_t = exp(dt_t * A_h)      (A_h < 0, one number per head)
    H_t  = a_t * H_{t-1} + dt_t * x_t B_t^T      y_t = H_t C_t + D_h * x_t

Because the decay is a scalar, the map x -> y within a chunk of Q steps is a masked matrix product,
y = (L o C B^T) (dt x) with L_ij = exp(cs_i - cs_j) for j <= i (cs the cumulative sum of dt*A). The chunked
algorithm ("quadratic within a chunk, linear across chunks") computes each chunk's output with matmuls,
each chunk's state contribution with a matmul, and passes only the (P, N) states from chunk to chunk.

`ssm_core.reference.ssd_chunk_scan_ref` is that algorithm in plain PyTorch (the ground truth);
`ssm_core.ops.ssd_chunk_scan` dispatches it like the other ops (CUDA tensors to the Triton kernel
`kernels.ssd_chunk_scan`). Both take the arguments of mamba_ssm's `mamba_chunk_scan_combined`, so they are
drop-in comparable.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .mamba import carry_state
from .model import MambaConfig, register_mixer
from .ops import causal_conv1d, ssd_chunk_scan


# --- the block -----------------------------------------------------------------------------------------
def check_mixer_input(x: torch.Tensor, d_model: int) -> None:
    """The input check every mixer shares: x (batch, L >= 1, d_model), floating point."""
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != d_model:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x: expected shape (batch, L, d_model={d_model}), got {got}")
    if not x.is_floating_point() or x.shape[1] < 1:
        raise ValueError(f"x: expected a floating-point tensor with L >= 1, got {x.dtype} {tuple(x.shape)}")


class GatedRMSNorm(nn.Module):
    """mamba_ssm's RMSNormGated with norm_before_gate=False: RMSNorm(x * silu(z)) per group of channels."""

    def __init__(self, d: int, group_size: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.eps, self.group_size = eps, group_size
        self.weight = nn.Parameter(torch.ones(d, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        ct = torch.float64 if x.dtype == torch.float64 else torch.float32
        xf = x.to(ct) * F.silu(z.to(ct))
        xg = xf.unflatten(-1, (-1, self.group_size))
        xg = xg * torch.rsqrt(xg.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xg.flatten(-2) * self.weight.to(ct)).to(x.dtype)


@dataclass
class Mamba2State:
    """Recurrent state of one Mamba2 mixer (updated in place by `Mamba2.stream`; replaced while autograd
    records: `carry_state`)."""
    conv: torch.Tensor  # (batch, conv_dim, d_conv - 1): the last inputs of the causal conv over [x, B, C]
    ssm: torch.Tensor   # (batch, nheads, headdim, d_state), float32 (float64 for float64 models)


class Mamba2(nn.Module):
    def __init__(self, d_model: int, d_state: int = 128, d_conv: int = 4, conv_init: float | None = None,
                 expand: int = 2, headdim: int = 64, ngroups: int = 1, A_init_range=(1, 16),
                 D_has_hdim: bool = False, rmsnorm: bool = True, dt_min: float = 0.001, dt_max: float = 0.1,
                 dt_init_floor: float = 1e-4, bias: bool = False, conv_bias: bool = True, chunk_size: int = 256,
                 layer_idx: int | None = None, device=None, dtype=None):
        super().__init__()
        for name, v in (("d_model", d_model), ("d_state", d_state), ("d_conv", d_conv), ("expand", expand),
                        ("headdim", headdim), ("ngroups", ngroups), ("chunk_size", chunk_size)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"Mamba2 {name}: expected a positive integer, got {v!r}")
        fk = {"device": device, "dtype": dtype}
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = expand * d_model
        if self.d_inner % headdim:
            raise ValueError(f"Mamba2 headdim: {headdim} must divide d_inner = expand * d_model = {self.d_inner}")
        self.headdim, self.nheads = headdim, self.d_inner // headdim
        if self.nheads % ngroups:
            raise ValueError(f"Mamba2 ngroups: {ngroups} must divide the number of heads {self.nheads}")
        self.ngroups, self.D_has_hdim, self.rmsnorm = ngroups, D_has_hdim, rmsnorm
        self.chunk_size, self.layer_idx = chunk_size, layer_idx

        # in_proj output order as mamba_ssm: [z, x, B, C, dt].
        self.conv_dim = self.d_inner + 2 * ngroups * d_state
        self.in_proj = nn.Linear(d_model, self.d_inner + self.conv_dim + self.nheads, bias=bias, **fk)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, kernel_size=d_conv, groups=self.conv_dim,
                                padding=d_conv - 1, bias=conv_bias, **fk)
        if conv_init is not None:
            nn.init.uniform_(self.conv1d.weight, -conv_init, conv_init)
        # dt_bias = softplus^-1(dt), dt ~ LogUniform(dt_min, dt_max); A = -U(A_init_range) per head.
        dt = torch.exp(torch.rand(self.nheads, **fk) * (math.log(dt_max) - math.log(dt_min))
                       + math.log(dt_min)).clamp(min=dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.dt_bias._no_weight_decay = True
        A = torch.empty(self.nheads, dtype=torch.float32, device=device).uniform_(*A_init_range)
        self.A_log = nn.Parameter(torch.log(A).to(dtype=dtype))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(self.d_inner if D_has_hdim else self.nheads, device=device))
        self.D._no_weight_decay = True
        if rmsnorm:
            self.norm = GatedRMSNorm(self.d_inner, group_size=self.d_inner // ngroups, **fk)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **fk)

    def _D(self) -> torch.Tensor:
        return self.D.float().view(self.nheads, self.headdim) if self.D_has_hdim else self.D.float()

    def _mix(self, x: torch.Tensor, state: Mamba2State | None):
        """The whole block on a chunk; continues from (and updates) `state` when given."""
        b, L, _ = x.shape
        z, xBC, dt = torch.split(self.in_proj(x), [self.d_inner, self.conv_dim, self.nheads], dim=-1)
        conv_w = self.conv1d.weight.squeeze(1)
        xBC = xBC.transpose(1, 2).contiguous()  # (b, conv_dim, L); strided input is far slower on CPU
        if state is None:
            xBC = causal_conv1d(xBC, conv_w, self.conv1d.bias, activation="silu")
        else:
            xBC, tail = causal_conv1d(xBC, conv_w, self.conv1d.bias, initial_states=state.conv,
                                      return_final_states=True, activation="silu")
            carry_state(state, "conv", tail)
        xs, B, C = torch.split(xBC.transpose(1, 2), [self.d_inner, self.ngroups * self.d_state,
                                                      self.ngroups * self.d_state], dim=-1)
        gs = (b, L, self.ngroups, self.d_state)
        out = ssd_chunk_scan(xs.reshape(b, L, self.nheads, self.headdim), dt, -torch.exp(self.A_log.float()),
                             B.reshape(gs), C.reshape(gs), chunk_size=self.chunk_size, D=self._D(),
                             z=None if self.rmsnorm else z.reshape(b, L, self.nheads, self.headdim),
                             dt_bias=self.dt_bias.float(), dt_softplus=True,
                             initial_states=None if state is None else state.ssm,
                             return_final_states=state is not None)
        if state is not None:
            out, final = out
            carry_state(state, "ssm", final)
        y = out.reshape(b, L, self.d_inner)
        if self.rmsnorm:
            y = self.norm(y, z)
        return self.out_proj(y)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (batch, L, d_model) -> (batch, L, d_model)."""
        check_mixer_input(x, self.d_model)
        return self._mix(x, None)

    def init_state(self, batch_size: int, device=None, dtype=None) -> Mamba2State:
        p = self.in_proj.weight
        device = device if device is not None else p.device
        dtype = dtype if dtype is not None else p.dtype
        return Mamba2State(
            conv=torch.zeros(batch_size, self.conv_dim, self.d_conv - 1, device=device, dtype=dtype),
            ssm=torch.zeros(batch_size, self.nheads, self.headdim, self.d_state, device=device,
                            dtype=torch.float64 if dtype == torch.float64 else torch.float32))

    def stream(self, x: torch.Tensor, state: Mamba2State) -> tuple[torch.Tensor, Mamba2State]:
        """Consume a chunk x (batch, T, d_model), T >= 1, continuing from `state` (updated in place); the
        output equals the matching slice of `forward` over the whole stream."""
        check_mixer_input(x, self.d_model)
        if state.ssm.shape[0] != x.shape[0]:
            raise ValueError(f"state: built for batch {state.ssm.shape[0]}, got x with batch {x.shape[0]}")
        return self._mix(x, state), state


@register_mixer("mamba2")
def _mamba2_mixer(cfg: MambaConfig, d_model: int, layer_idx: int) -> nn.Module:
    opts = dict(cfg.mixer_options.get("mamba2", {}))
    opts.setdefault("d_state", cfg.d_state)
    # mamba_ssm's headdim 64 when it divides d_inner, else the largest power of two that does (small models).
    opts.setdefault("headdim", math.gcd(cfg.expand * d_model, 64))
    return Mamba2(d_model, d_conv=cfg.d_conv, expand=cfg.expand, layer_idx=layer_idx, **opts)
