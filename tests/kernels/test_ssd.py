"""kernels.ssd_chunk_scan (Mamba-2's chunked SSD) against the reference (ssm_core.reference), output,
final state and every gradient, with small tiles so that every code path runs on tiny shapes.

On the CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py): tiny
shapes, every code path. Tests marked `cuda` are the device sweep (pytest tests/kernels -m cuda).
Tolerances (relative Frobenius error vs float64): fp32 1e-4, bf16/fp16 1e-2.
"""
from __future__ import annotations

import pytest
import torch

from ssm_core.reference import ssd_chunk_scan_ref

from ..ssm_core.helpers import rel, ssd_inputs


@pytest.mark.parametrize("L,chunk,g,D_hdim,gated,hpp", [(40, 16, 2, False, True, 1), (45, 32, 1, True, False, 3),
                                                        (100, 16, 1, False, False, 1)])
def test_triton_ssd_matches_reference(L, chunk, g, D_hdim, gated, hpp):
    kernels_ssd = pytest.importorskip("kernels.ssd", reason="kernels.ssd needs triton")
    # 16-row tiles: several causal tiles per chunk, ragged last chunk. dB / dC summed over head splits by
    # atomics (hpp 3 of 4 heads: uneven splits, a padded per-head slot). State passes: several state blocks,
    # and groups of 2 chunks (L 40: 2 groups, L 100: 4; the last one ragged).
    config = kernels_ssd.SSDConfig(block_m=16, block_m_bwd=16, heads_per_program=hpp, state_block=64,
                                   chunks_per_group=2)
    t = ssd_inputs(b=2, L=L, h=4, p=16, g=g, n=16, dtype=torch.float32, D_hdim=D_hdim, seed=3)
    if not gated:
        t.pop("z")
    t = {k: v.float().requires_grad_() for k, v in t.items()}
    y, H = kernels_ssd.ssd_chunk_scan(**t, chunk_size=chunk, dt_softplus=True, return_final_states=True,
                                      config=config)
    y0, H0 = ssd_chunk_scan_ref(**t, chunk_size=chunk, dt_softplus=True, return_final_states=True)
    assert rel(y, y0) < 1e-3 and rel(H, H0) < 1e-3
    gy, gH = torch.randn_like(y0), torch.randn_like(H0)
    grads = torch.autograd.grad((y * gy).sum() + (H * gH).sum(), list(t.values()))
    grads0 = torch.autograd.grad((y0 * gy).sum() + (H0 * gH).sum(), list(t.values()))
    for name, gr, gr0 in zip(t, grads, grads0):
        assert torch.isfinite(gr).all(), name
        assert rel(gr, gr0) < 2e-3, f"grad of {name}: rel err {rel(gr, gr0):.2e}"


def test_triton_ssd_rejects_bad_arguments():
    kernels_ssd = pytest.importorskip("kernels.ssd", reason="kernels.ssd needs triton")
    t = ssd_inputs(b=2, L=20, h=4, p=16, g=2, n=16, dtype=torch.float32)
    with pytest.raises(ValueError, match="initial_states: expected shape"):
        kernels_ssd.ssd_chunk_scan(**{**t, "initial_states": torch.zeros(2, 4, 16, 8)})
    with pytest.raises(ValueError, match="ngroups dividing nheads=4"):
        kernels_ssd.ssd_chunk_scan(**{**t, "B": torch.zeros(2, 20, 3, 16), "C": torch.zeros(2, 20, 3, 16)})
    with pytest.raises(ValueError, match="chunk_size"):
        kernels_ssd.ssd_chunk_scan(**t, chunk_size=24)
    with pytest.raises(ValueError, match="SSDConfig.block_m: expected a power of two"):
        kernels_ssd.SSDConfig(block_m=24)
    with pytest.raises(ValueError, match="SSDConfig.heads_per_program: expected a positive integer"):
        kernels_ssd.SSDConfig(heads_per_program=0)
