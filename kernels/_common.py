"""What the kernels share: Triton helpers (inlined where they are called, so a kernel compiles as if
they were written in it) and host-side layout helpers."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _row(x, offs, i):
    """Row i of a 3-D tile along its middle axis, which sits in each thread's registers: a register pick,
    the middle axis kept as size 1."""
    return tl.sum(tl.where((offs == i)[None, :, None], x, 0.), axis=1)[:, None, :]


@triton.jit
def _softplus(x):
    """log(1 + exp(x)), x itself above 20: torch's softplus threshold (fp32)."""
    return tl.where(x > 20., x, tl.log(1. + tl.exp(x)))


def group_strides(X: torch.Tensor, ungrouped_dims: int) -> tuple[int, ...]:
    """Strides of B or C, given as (batch, ...) or grouped (batch, G, ...), as (batch, group, ...): a
    stride 0 stands for the group axis of an ungrouped tensor (every channel reads the one group)."""
    if X.dim() == ungrouped_dims:
        return (X.stride(0), 0, *X.stride()[1:])
    return tuple(X.stride())


def partial_slots(writers: int) -> int:
    """Copies of a backward sum that many programs add into (dB and dC of the scan, the conv's dw): one,
    added by fp32 atomics, whose arrival order varies between runs and with it the last bits of the sum (a
    training re-run then drifts like another seed); or, under `torch.use_deterministic_algorithms(True)`
    (Lightning's `Trainer(deterministic=...)`), one per writer, each written by one program and added on the
    host in a fixed order, for bit-identical re-runs at the cost of that memory and one reduction."""
    return writers if torch.are_deterministic_algorithms_enabled() else 1


def slots_sum(x: torch.Tensor) -> torch.Tensor:
    """The sum of a backward sum's copies (leading axis: partial_slots); one copy is itself, not copied."""
    return x.sum(0) if x.shape[0] > 1 else x[0]
