"""Under torch.use_deterministic_algorithms(True) the backward kernels write each program's part of a shared
sum (the scan's dB / dC, the conv's dw / dbias, SSD's dB / dC / dD) to its own copy and add the copies in a
fixed order, instead of fp32 atomics whose order varies between runs (kernels._common.partial_slots).

On the CPU (Triton's interpreter runs programs one by one, so atomics are ordered there anyway) the tests
check that the copies are used and that the gradients stay right; on the device, that two backward passes
are bit-identical, with enough programs adding into each sum for atomics to race.
"""
from __future__ import annotations

import pytest
import torch

import kernels
import kernels.conv
import kernels.scan
from ssm_core.reference import ssd_chunk_scan_ref

from ..ssm_core.helpers import ssd_inputs
from . import test_conv
from .helpers import cuda, rel
from .test_mamba_inner import mamba_inner_params
from .test_scan import check_scan, scan_inputs


def spy_slots(monkeypatch, module) -> list[int]:
    """The copy counts `module` asks partial_slots for."""
    seen, real = [], module.partial_slots
    monkeypatch.setattr(module, "partial_slots", lambda n: seen.append(real(n)) or seen[-1])
    return seen


def test_slots_only_in_deterministic_mode():
    assert kernels._common.partial_slots(7) == 1
    torch.use_deterministic_algorithms(True, warn_only=True)   # Lightning's deterministic="warn" counts too
    assert kernels._common.partial_slots(7) == 7
    x = torch.arange(6.).view(3, 2)
    assert torch.equal(kernels._common.slots_sum(x), torch.tensor([6., 9.]))
    assert kernels._common.slots_sum(x[:1]).data_ptr() == x.data_ptr()   # one copy: no new tensor


def test_scan_gradients_from_per_block_copies_cpu(monkeypatch, deterministic_algorithms):
    # 8 channels in blocks of 2: four programs add into each dB / dC element; grouped B / C.
    seen = spy_slots(monkeypatch, kernels.scan)
    cfg = kernels.ScanConfig(block_t=4, block_t_bwd=2, block_d=2, ckpt_chunks=2)
    check_scan(scan_inputs(b=2, d=8, L=11, n=4, groups=2), softplus=True, tol=1e-4, config=cfg)
    assert seen == [4]


def test_conv_gradients_from_per_program_copies_cpu(monkeypatch, deterministic_algorithms):
    seen = spy_slots(monkeypatch, kernels.conv)
    test_conv.test_causal_conv1d_spans_cpu(monkeypatch)   # batch 2 x 3 programs along L
    assert seen == [6]


def test_ssd_gradients_from_per_split_copies_cpu(monkeypatch, deterministic_algorithms):
    kernels_ssd = pytest.importorskip("kernels.ssd", reason="kernels.ssd needs triton")
    seen = spy_slots(monkeypatch, kernels_ssd)
    config = kernels_ssd.SSDConfig(block_m=16, block_m_bwd=16, heads_per_program=1, state_block=64,
                                   chunks_per_group=2)
    t = ssd_inputs(b=2, L=40, h=4, p=16, g=2, n=16, dtype=torch.float32, D_hdim=True, seed=5)
    t = {k: v.float().requires_grad_() for k, v in t.items()}
    y = kernels_ssd.ssd_chunk_scan(**t, chunk_size=16, dt_softplus=True, config=config)
    y0 = ssd_chunk_scan_ref(**t, chunk_size=16, dt_softplus=True)
    gy = torch.randn_like(y0)
    grads = torch.autograd.grad((y * gy).sum(), list(t.values()))
    grads0 = torch.autograd.grad((y0 * gy).sum(), list(t.values()))
    for name, gr, gr0 in zip(t, grads, grads0):
        assert rel(gr, gr0) < 2e-3, f"grad of {name}: rel err {rel(gr, gr0):.2e}"
    # dD: a copy per (16-row key tile of a 16-step chunk, batch row): 3 x 1 x 2; dB / dC: 2 heads a group, 1
    # per program: 2 splits.
    assert seen == [6, 2]


def backward_twice(dev: str, small: bool) -> None:
    """Scan, conv, SSD and the fused Mamba block: the same backward twice, every gradient bit-identical. On
    the device at sizes where many programs add into each sum (the scan's 256 channels in blocks, the conv's 4
    x 16 programs along L, SSD's heads one per program and its 2 x 32 key tiles adding into dD); `small` runs
    the same code at interpreter sizes."""
    b, d, L, d_model = (1, 8, 16, 8) if small else (4, 256, 2048, 128)

    def grads(fn, inputs):
        leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items() if v is not None}
        out = fn(**{**inputs, **leaves})   # (None: an absent optional input, passed as such)
        out = out[0] if isinstance(out, tuple) else out
        g = torch.Generator(device=dev).manual_seed(1)
        (out.float() * torch.randn(out.shape, generator=g, device=dev)).sum().backward()
        return [v.grad for v in leaves.values()]

    dtype = torch.float32 if small else torch.bfloat16
    scan = scan_inputs(b=b, d=d, L=L, n=4 if small else 16, dtype=dtype, device=dev)
    conv = dict(x=torch.randn(b, d, 2 * L, device=dev), weight=torch.randn(d, 4, device=dev),
                bias=torch.randn(d, device=dev))
    kernels_ssd = pytest.importorskip("kernels.ssd", reason="kernels.ssd needs triton")
    ssd = ssd_inputs(b=2, L=L, h=4 if small else 8, p=16 if small else 64, g=1, n=16 if small else 64, seed=2)
    ssd = {k: v.to(dev, dtype if k in ("x", "B", "C", "z") else torch.float32) for k, v in ssd.items()}
    ssd_cfg = kernels_ssd.SSDConfig(heads_per_program=1, **(dict(block_m=16, block_m_bwd=16) if small else {}))
    inner = {**mamba_inner_params(d_model, d, 4 if small else 16, 2 if small else 8, device=dev),
             "x": torch.randn(b, L, d_model, device=dev)}
    cases = {
        "selective_scan": (lambda **t: kernels.selective_scan(**t, delta_softplus=True), scan),
        "causal_conv1d": (lambda **t: kernels.causal_conv1d(**t, activation="silu"), conv),
        "ssd_chunk_scan": (lambda **t: kernels_ssd.ssd_chunk_scan(**t, chunk_size=16 if small else 256,
                                                                  dt_softplus=True, config=ssd_cfg), ssd),
        "mamba_inner": (lambda x, **p: kernels.mamba_inner(x, **p), inner),
    }
    for name, (fn, inputs) in cases.items():
        first, second = (grads(fn, inputs) for _ in range(2))
        assert len(first) == len(second) == len(inputs) - sum(v is None for v in inputs.values())
        for i, (a, b_) in enumerate(zip(first, second)):
            assert torch.isfinite(a).all() and torch.equal(a, b_), f"{name}: gradient {i} differs between two runs"


def test_backward_twice_runs_at_interpreter_sizes_cpu(deterministic_algorithms):
    backward_twice("cpu", small=True)


@cuda
@pytest.mark.cuda
def test_backward_is_bit_identical_on_the_gpu(deterministic_algorithms):
    backward_twice("cuda", small=False)
