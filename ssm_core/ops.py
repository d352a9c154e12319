"""The single dispatch point between `ssm_core` and its op implementations.

CUDA tensors go to the fused Triton kernels of the `kernels` package; CPU tensors go to the fast CPU
path (ssm_core.cpu) where it has the op, else to the pure-PyTorch reference (ssm_core.reference). This
is the only module of ssm_core that reaches `kernels`, and `kernels` imports nothing from ssm_core.
`SSM_CORE_BACKEND` forces a choice:

    SSM_CORE_BACKEND=auto       (default) as above
    SSM_CORE_BACKEND=reference  always the pure-PyTorch reference (ssm_core.reference)
    SSM_CORE_BACKEND=triton     always the Triton kernels (on CPU only under TRITON_INTERPRET=1)

`backend_for(tensor)` tells which one a call would use.
"""
from __future__ import annotations

import os

import torch

from . import cpu, reference

_BACKENDS = ("auto", "reference", "triton")


def forced_backend() -> str:
    """SSM_CORE_BACKEND, checked: "auto", "reference" or "triton"."""
    b = os.environ.get("SSM_CORE_BACKEND", "auto").strip().lower() or "auto"
    if b not in _BACKENDS:
        raise ValueError(f"SSM_CORE_BACKEND: expected one of {_BACKENDS}, got {b!r}")
    return b


def _kernels():
    """The `kernels` package, or None where it cannot be imported (no Triton). This module is the only one
    of ssm_core that imports it (tests/test_layering.py checks), so that ssm_core works without Triton."""
    try:
        import kernels
    except ImportError:
        return None
    return kernels


def backend_for(x: torch.Tensor) -> str:
    """'triton', 'cpu' or 'reference': where an op on tensor `x` runs."""
    forced = forced_backend()
    if forced != "auto":
        return forced
    if x.is_cuda:
        # The kernels compute in float32: float64 (used for exact checks) stays on the reference.
        return "triton" if x.dtype != torch.float64 and _kernels() is not None else "reference"
    return "cpu"


def _impl(x: torch.Tensor, op: str):
    backend = backend_for(x)
    if backend == "triton":
        mod = _kernels()
        if mod is None:
            raise RuntimeError("SSM_CORE_BACKEND=triton but the kernels package cannot be imported")
        return getattr(mod, op)
    if backend == "cpu":
        fn = getattr(cpu, op, None)
        if fn is not None:
            return fn
    return getattr(reference, op + "_ref")


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   h0=None, return_final_state=False):
    """Selective scan with the signature and semantics of `selective_scan_ref`, on the fastest backend."""
    if not isinstance(u, torch.Tensor):
        raise ValueError("u: expected a torch.Tensor of shape (batch, dim, L)")
    return _impl(u, "selective_scan")(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                                      delta_softplus=delta_softplus, h0=h0, return_final_state=return_final_state)


def causal_conv1d(x, weight, bias=None, initial_states=None, return_final_states=False, activation=None):
    """Depthwise causal conv1d with carried tail; semantics of `causal_conv1d_ref`."""
    if not isinstance(x, torch.Tensor):
        raise ValueError("x: expected a torch.Tensor of shape (batch, dim, L)")
    return _impl(x, "causal_conv1d")(x, weight, bias, initial_states=initial_states,
                                     return_final_states=return_final_states, activation=activation)


def mamba_inner(x, in_proj_weight, in_proj_bias, conv_weight, conv_bias, x_proj_weight, dt_proj_weight,
                dt_proj_bias, A, D, out_proj_weight, out_proj_bias=None, norm_weight=None, norm_eps=1e-5):
    """The selective Mamba block from its parameters (with `norm_weight`: the pre-norm residual block
    x + inner(rms_norm(x))); semantics of `mamba_inner_ref`. On CUDA one fused autograd function
    (kernels.mamba_inner: no layout copies, recomputes instead of saving); elsewhere the reference
    composition over this backend's scan, conv and norm."""
    if not isinstance(x, torch.Tensor):
        raise ValueError("x: expected a torch.Tensor of shape (batch, L, d_model)")
    args = (x, in_proj_weight, in_proj_bias, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias,
            A, D, out_proj_weight, out_proj_bias, norm_weight, norm_eps)
    if backend_for(x) == "triton":
        return _impl(x, "mamba_inner")(*args)
    return reference.mamba_inner_ref(*args, scan=_impl(x, "selective_scan"), conv=_impl(x, "causal_conv1d"),
                                     norm=_impl(x, "rms_norm"))


def rms_norm(x, weight, eps=1e-5, out_dtype=None):
    """RMSNorm over the last axis in float32, output in out_dtype (default x's); `rms_norm_ref` semantics."""
    return _impl(x, "rms_norm")(x, weight, eps, out_dtype)


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """One decoding step, updating `state` in place; semantics of `selective_state_update_ref`."""
    return _impl(x, "selective_state_update")(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias,
                                              dt_softplus=dt_softplus)


# The CPU runs Mamba-2's SSD as the reference's chunked matmuls, whose intra-chunk part (a chunk x chunk decay
# matrix per batch and head) dominates at Mamba-2's chunk of 256. The result does not depend on the chunk
# (to float rounding, ~3e-7 relative), and chunks of 64 are 1.8-6x faster on the CPU (docs/cpu.md).
CPU_SSD_CHUNK = 64


def ssd_chunk_scan(x, dt, A, B, C, chunk_size: int = 256, D=None, z=None, dt_bias=None,
                   dt_softplus: bool = False, initial_states=None, return_final_states: bool = False):
    """Mamba-2's chunked SSD with the signature and semantics of `ssd_chunk_scan_ref` (mamba_ssm's
    `mamba_chunk_scan_combined` arguments): the Triton kernel for CUDA tensors, else the reference (the CPU
    has no faster path: the reference is already chunked matmuls; on the CPU backend in chunks of at most
    CPU_SSD_CHUNK)."""
    if not isinstance(x, torch.Tensor):
        raise ValueError("x: expected a torch.Tensor of shape (batch, L, nheads, headdim)")
    if backend_for(x) == "cpu":
        chunk_size = min(chunk_size, CPU_SSD_CHUNK)
    return _impl(x, "ssd_chunk_scan")(x, dt, A, B, C, chunk_size=chunk_size, D=D, z=z, dt_bias=dt_bias,
                                      dt_softplus=dt_softplus, initial_states=initial_states,
                                      return_final_states=return_final_states)
