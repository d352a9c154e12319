"""S4D: the diagonal, time-invariant (LTI) state space mixer (Gu et al. 2022, "On the Parameterization and
Initialization of Diagonal State Space Models"), the non-selective baseline of the selectivity demonstration.

Per channel h, with N/2 complex modes (the conjugate halves are implied, hence the 2 Re below):

    s_t = exp(dt A) s_{t-1} + (exp(dt A) - 1) / A * u_t        (zero-order hold)
    y_t = 2 Re(C s_t) + D u_t

Nothing depends on the input, so the whole map is one convolution with the kernel
K[l] = 2 Re(sum_n C_n (exp(dt A_n) - 1) / A_n * exp(dt A_n l)). Training uses that convolution through
the FFT (O(L log L)); streaming runs the recurrence chunk by chunk with the complex state s.
Block layout as the S4 repository's S4D layer: SSM conv + D skip, GELU, then a GLU output projection.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .mamba import carry_state
from .mamba2 import check_mixer_input
from .model import MambaConfig, register_mixer

# Steps of the Vandermonde matrix exp(dt A l) materialised at once when building the kernel: bounds memory
# for long L (H * N/2 * KERNEL_CHUNK complex numbers); the result does not depend on it.
KERNEL_CHUNK = 4096


@dataclass
class S4DState:
    ssm: torch.Tensor  # (batch, d_model, d_state // 2) complex64 (complex128 for float64 models)


class S4D(nn.Module):
    def __init__(self, d_model: int, d_state: int = 64, init: str = "inv", dt_min: float = 0.001,
                 dt_max: float = 0.1, layer_idx: int | None = None, device=None, dtype=None):
        super().__init__()
        if not isinstance(d_state, int) or d_state < 2 or d_state % 2:
            raise ValueError(f"S4D d_state: expected an even integer >= 2 (N/2 complex modes), got {d_state!r}")
        if init not in ("lin", "inv"):
            raise ValueError(f"S4D init: expected 'lin' (S4D-Lin) or 'inv' (S4D-Inv), got {init!r}")
        self.d_model, self.d_state, self.layer_idx = d_model, d_state, layer_idx
        H, M = d_model, d_state // 2
        n = torch.arange(M, dtype=torch.float32, device=device)
        # S4D-Lin: A_n = -1/2 + i pi n (Fourier-like frequencies); S4D-Inv: A_n = -1/2 + i N/pi (N/(2n+1) - 1)
        # (approximates S4's HiPPO-LegS spectrum).
        A_imag = math.pi * n if init == "lin" else d_state / math.pi * (d_state / (2 * n + 1) - 1)
        self.log_A_real = nn.Parameter(torch.log(0.5 * torch.ones(H, M, device=device)))
        self.A_imag = nn.Parameter(A_imag.repeat(H, 1))
        self.log_dt = nn.Parameter(torch.rand(H, device=device) * (math.log(dt_max) - math.log(dt_min))
                                   + math.log(dt_min))
        # C ~ CN(0, 1), stored as (real, imag); B is folded into C (fixed to 1), as in S4D.
        self.C = nn.Parameter(torch.view_as_real(torch.randn(H, M, dtype=torch.cfloat, device=device)
                                                 * math.sqrt(0.5)))
        self.D = nn.Parameter(torch.randn(H, device=device))
        for p in (self.log_A_real, self.A_imag, self.log_dt):
            p._no_weight_decay = True
        self.out_proj = nn.Linear(d_model, 2 * d_model, device=device, dtype=dtype)  # -> GLU

    # --- the discretised SSM ----------------------------------------------------------------------------
    def _discrete(self, real_dtype: torch.dtype):
        """(dt A, dB, C), each (H, N/2) complex: complex128 for float64, else complex64. dA = exp(dt A)."""
        rd = torch.float64 if real_dtype == torch.float64 else torch.float32
        A = torch.complex(-torch.exp(self.log_A_real.to(rd)), self.A_imag.to(rd))
        dtA = A * torch.exp(self.log_dt.to(rd))[:, None]
        dB = (torch.exp(dtA) - 1) / A                                      # zero-order hold
        return dtA, dB, torch.view_as_complex(self.C.to(rd).contiguous())

    @staticmethod
    def _powers(dtA: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """exp(dt A * l) for l in [start, stop): (H, N/2, stop - start)."""
        steps = torch.arange(start, stop, device=dtA.device, dtype=dtA.real.dtype)
        return torch.exp(dtA[..., None] * steps)

    def kernel(self, L: int, real_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The convolution kernel K (H, L), real."""
        dtA, dB, C = self._discrete(real_dtype)
        CdB = C * dB
        return torch.cat([2 * torch.einsum("hn,hnl->hl", CdB, self._powers(dtA, s, min(L, s + KERNEL_CHUNK))).real
                          for s in range(0, L, KERNEL_CHUNK)], dim=-1)

    @staticmethod
    def _fft_conv(u: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
        """Causal convolution of u (b, H, L) with K (H, L) via zero-padded FFT."""
        L = u.shape[-1]
        n = 2 * L
        return torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(K, n=n), n=n)[..., :L]

    def _output(self, y: torch.Tensor, u: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        y = y + u * self.D.to(u.dtype)[:, None]
        y = F.gelu(y).transpose(1, 2).to(x.dtype)
        return F.glu(self.out_proj(y), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (batch, L, d_model) -> (batch, L, d_model)."""
        check_mixer_input(x, self.d_model)
        rd = torch.float64 if x.dtype == torch.float64 else torch.float32
        u = x.transpose(1, 2).to(rd)
        return self._output(self._fft_conv(u, self.kernel(u.shape[-1], rd)), u, x)

    # --- streaming ----------------------------------------------------------------------------------
    def init_state(self, batch_size: int, device=None, dtype=None) -> S4DState:
        device = device if device is not None else self.D.device
        dtype = dtype if dtype is not None else self.D.dtype
        cd = torch.complex128 if dtype == torch.float64 else torch.complex64
        return S4DState(ssm=torch.zeros(batch_size, self.d_model, self.d_state // 2, device=device, dtype=cd))

    def stream(self, x: torch.Tensor, state: S4DState) -> tuple[torch.Tensor, S4DState]:
        """Consume a chunk x (batch, T, d_model) from `state` (updated in place); equal to `forward` over
        the whole stream. Within the chunk: the convolution; across chunks: the state s (O(N) per channel)."""
        check_mixer_input(x, self.d_model)
        if state.ssm.shape[0] != x.shape[0]:
            raise ValueError(f"state: built for batch {state.ssm.shape[0]}, got x with batch {x.shape[0]}")
        rd = torch.float64 if state.ssm.dtype == torch.complex128 else torch.float32
        u = x.transpose(1, 2).to(rd)                                      # (b, H, T)
        T = u.shape[-1]
        dtA, dB, C = self._discrete(rd)
        powers = self._powers(dtA, 0, T + 1)                              # (H, M, T+1)
        y = self._fft_conv(u, self.kernel(T, rd))
        # The carried state as seen at step t of the chunk: decayed t + 1 times.
        y = y + 2 * torch.einsum("hn,bhn,hnt->bht", C, state.ssm, powers[..., 1:]).real
        # New state: s_T = dA^T s_0 + sum_t dA^(T-1-t) dB u_t.
        inject = torch.einsum("hnt,bht->bhn", powers[..., :T].flip(-1), u.to(powers.dtype)) * dB
        carry_state(state, "ssm", powers[..., T] * state.ssm + inject)
        return self._output(y, u, x), state


@register_mixer("s4d")
def _s4d_mixer(cfg: MambaConfig, d_model: int, layer_idx: int) -> nn.Module:
    opts = dict(cfg.mixer_options.get("s4d", {}))
    opts.setdefault("d_state", max(2, cfg.d_state - cfg.d_state % 2))
    return S4D(d_model, layer_idx=layer_idx, **opts)
