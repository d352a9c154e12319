"""kernels.selective_scan against the float64 reference (ssm_core.reference), forward and every
gradient: options on/off, grouped B/C, padded N, checkpoint and parallel segments, L = 1, packed
sequences; on the device L up to 65536, N up to 256, fp32/bf16/fp16, h0 on/off.

On the CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py): tiny
shapes, every code path. Tests marked `cuda` are the device sweep (pytest tests/kernels -m cuda).
Tolerances (relative Frobenius error vs float64): fp32 1e-4, bf16/fp16 1e-2.
"""
from __future__ import annotations

import pytest
import torch

import kernels
from kernels import ScanConfig
from ssm_core.reference import selective_scan_ref

from .helpers import TOL, cuda, rel


def scan_inputs(b, d, L, n, groups=None, dtype=torch.float32, full=True, h0=True, device="cpu", seed=0):
    """Fresh random inputs (never zeros). u, delta, z, B, C in `dtype`; A, D, bias, h0 in float32."""
    g = torch.Generator(device=device).manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, device=device)  # noqa: E731
    bc = (b, n, L) if groups is None else (b, groups, n, L)
    t = dict(u=r(b, d, L), delta=r(b, d, L) * 0.5, A=-torch.rand(d, n, generator=g, device=device) * 2 - 0.1,
             B=r(*bc), C=r(*bc))
    if full:
        t.update(D=r(d), z=r(b, d, L), delta_bias=r(d) * 0.3)
    if h0:
        t["h0"] = r(b, d, n)
    return {k: v.to(dtype) if k in ("u", "delta", "B", "C", "z") else v for k, v in t.items()}


def check_scan(t: dict, softplus: bool, tol: float, config: ScanConfig | None = None, seed: int = 1):
    """Kernel vs float64 reference: y, final state, and the gradient of every input under random
    upstream gradients of both y and the final state."""
    t_k = {k: v.clone().requires_grad_() for k, v in t.items()}
    t_r = {k: v.double().requires_grad_() for k, v in t.items()}
    y, h = kernels.selective_scan(**t_k, delta_softplus=softplus, return_final_state=True, config=config)
    y_r, h_r = selective_scan_ref(**t_r, delta_softplus=softplus, return_final_state=True)
    assert y.dtype == t["u"].dtype and h.dtype == torch.float32 and y.shape == y_r.shape
    assert rel(y, y_r) < tol and rel(h, h_r) < tol
    g = torch.Generator(device=y.device).manual_seed(seed)
    gy = torch.randn(y_r.shape, generator=g, device=y.device, dtype=torch.float64)
    gh = torch.randn(h_r.shape, generator=g, device=y.device, dtype=torch.float64)
    ((y.double() * gy).sum() + (h.double() * gh).sum()).backward()
    ((y_r * gy).sum() + (h_r * gh).sum()).backward()
    errs = {k: rel(t_k[k].grad, t_r[k].grad) for k in t}
    assert all(t_k[k].grad.dtype == t[k].dtype for k in t)
    assert max(errs.values()) < tol, errs


@pytest.mark.parametrize("case", [
    dict(b=2, d=4, L=7, n=3),                         # all options, padded N, one chunk
    dict(b=1, d=4, L=9, n=4, groups=2),               # grouped B/C
    dict(b=2, d=3, L=6, n=2, full=False, h0=False),   # bare scan, no softplus
    dict(b=1, d=2, L=1, n=4),                         # L = 1
    dict(b=1, d=8, L=5, n=1),                         # more channel lanes than dB/dC sums
])
def test_scan_matches_reference_cpu(case):
    full = case.get("full", True)
    check_scan(scan_inputs(**case), softplus=full, tol=1e-4)


def test_scan_checkpoint_segments_cpu():
    # 4-step chunks, a checkpoint every 3 chunks: 23 steps = 6 chunks = 2 segments, the last one partial;
    # backward recomputes each segment from its checkpoint.
    cfg = ScanConfig(block_t=4, block_t_bwd=2, block_d=4, ckpt_chunks=3)
    check_scan(scan_inputs(b=1, d=4, L=23, n=2, groups=2), softplus=True, tol=1e-4, config=cfg)


@pytest.mark.parametrize("groups", [None, 2])
def test_scan_parallel_segments_cpu(groups):
    # The sequence cut into segments run side by side (the batch-1 path): 37 steps = 10 chunks of 4, a
    # checkpoint every 2 chunks, segments of 2 chunks (the last one partial). The summary pass, the carry
    # pass and the adjoint's carry must give exactly the one-segment result, h0 and final state included.
    cfg = ScanConfig(block_t=4, block_t_bwd=2, block_d=4, ckpt_chunks=2, seg_chunks=2)
    check_scan(scan_inputs(b=2, d=4, L=37, n=3, groups=groups, seed=7), softplus=True, tol=1e-4, config=cfg)


def test_lane_exchange_runs_only_where_channels_are_on_lanes():
    # _channels_on_lanes reads the layout of the compiled exchange (TTGIR lines as Triton 3.6 prints them):
    # one channel per lane passes; channels partly in registers (fp32 B/C at 8 states per lane) or states on
    # lanes (unaligned B/C) do not, and the backward then takes the butterfly.
    from kernels.scan import _channels_on_lanes

    def kernel(size, threads, with_asm=True):
        asm = ('    %k = tt.elementwise_inline_asm "shfl" {constraints = "=r,r,r,r", packed_element = 1 : i32, '
               'pure = true} %s, %dl, %m : tensor<2x1x16xf32, #blocked1>, tensor<2x1x16xi32, #blocked1>, '
               'tensor<2x1x16xi32, #blocked1> -> tensor<2x1x16xf32, #blocked1> loc(#loc9)\n')
        ttgir = ("#blocked = #ttg.blocked<{sizePerThread = [1, 8, 1], threadsPerWarp = [2, 1, 16], "
                 "warpsPerCTA = [1, 1, 1], order = [1, 0, 2]}>\n"
                 f"#blocked1 = #ttg.blocked<{{sizePerThread = {size}, threadsPerWarp = {threads}, "
                 "warpsPerCTA = [1, 1, 1], order = [1, 0, 2]}>\n" + (asm if with_asm else ""))
        return type("Compiled", (), {"asm": {"ttgir": ttgir}})()

    assert _channels_on_lanes(kernel("[1, 1, 1]", "[2, 1, 16]"), 16)
    assert not _channels_on_lanes(kernel("[1, 1, 2]", "[2, 2, 8]"), 16)     # a channel bit in registers
    assert not _channels_on_lanes(kernel("[1, 1, 1]", "[2, 8, 2]"), 16)     # states on lanes
    assert not _channels_on_lanes(kernel("[1, 1, 1]", "[2, 1, 16]", with_asm=False), 16)


def test_default_config_cuts_long_sequences_into_segments():
    small = kernels.default_config(1536, 65536, 16, batch=1)
    assert small.seg_chunks > 0 and small.seg_chunks % small.ckpt_chunks == 0
    assert kernels.default_config(1536, 2048, 16, batch=8).seg_chunks == 0
    assert kernels.default_config(1536, 2048, 16, batch=8).block_d == 16  # 2 lanes per channel, 8 states each
    assert kernels.default_config(1536, 16384, 64, batch=2).block_d == 4


def test_scan_under_activation_checkpointing_cpu():
    # Non-reentrant torch.utils.checkpoint allows ctx.saved_tensors to be unpacked only once per backward.
    from torch.utils.checkpoint import checkpoint
    t = scan_inputs(1, 4, 9, 3, seed=5)
    a = {k: v.clone().requires_grad_() for k, v in t.items()}
    b = {k: v.clone().requires_grad_() for k, v in t.items()}
    kernels.selective_scan(**a, delta_softplus=True).square().sum().backward()
    names = list(b)
    checkpoint(lambda *xs: kernels.selective_scan(**dict(zip(names, xs)), delta_softplus=True), *b.values(),
               use_reentrant=False).square().sum().backward()
    for k in t:
        assert torch.allclose(a[k].grad, b[k].grad, rtol=1e-5, atol=1e-6), k


def test_scan_bf16_cpu():
    check_scan(scan_inputs(b=1, d=4, L=8, n=4, dtype=torch.bfloat16), softplus=True, tol=1e-2)


def test_scan_in_segments_equals_whole_sequence_cpu():
    """The final state is differentiable: training over two segments with the state carried gives the
    same loss gradients as one pass over the whole sequence."""
    t = scan_inputs(b=1, d=2, L=10, n=3, h0=False)
    seq = ("u", "delta", "B", "C", "z")
    whole = {k: v.clone().requires_grad_() for k, v in t.items()}
    (kernels.selective_scan(**whole, delta_softplus=True) ** 2).sum().backward()
    parts = {k: v.clone().requires_grad_() for k, v in t.items()}
    first = {k: (v[..., :6] if k in seq else v) for k, v in parts.items()}
    second = {k: (v[..., 6:] if k in seq else v) for k, v in parts.items()}
    y1, h = kernels.selective_scan(**first, delta_softplus=True, return_final_state=True)
    y2 = kernels.selective_scan(**second, delta_softplus=True, h0=h)
    ((y1 ** 2).sum() + (y2 ** 2).sum()).backward()
    for k in t:
        assert rel(parts[k].grad, whole[k].grad) < 1e-5, k


def test_packed_variable_length_sequences_cpu():
    """cu_seqlens: sequences of 3, 6 and 2 steps packed along L give what each gives alone, gradients too."""
    t = scan_inputs(b=1, d=3, L=11, n=2, h0=False)
    cu = [0, 3, 9, 11]
    seq = ("u", "delta", "B", "C", "z")
    packed = {k: v.clone().requires_grad_() for k, v in t.items()}
    y = kernels.selective_scan(**packed, delta_softplus=True, cu_seqlens=torch.tensor(cu))
    alone = {k: v.clone().requires_grad_() for k, v in t.items()}
    ys = [kernels.selective_scan(**{k: (v[..., s:e] if k in seq else v) for k, v in alone.items()},
                                 delta_softplus=True) for s, e in zip(cu[:-1], cu[1:])]
    assert rel(y, torch.cat(ys, -1)) < 1e-6
    gy = torch.randn_like(y)
    (y * gy).sum().backward()
    (torch.cat(ys, -1) * gy).sum().backward()
    for k in t:
        assert rel(packed[k].grad, alone[k].grad) < 1e-5, k
    with pytest.raises(ValueError, match="cu_seqlens"):
        kernels.selective_scan(**t, cu_seqlens=torch.tensor([0, 4, 3, 11]))


def test_bad_input_is_a_clear_error():
    t = scan_inputs(b=1, d=2, L=3, n=2)
    with pytest.raises(ValueError, match="h0"):
        kernels.selective_scan(**{**t, "h0": torch.randn(1, 2, 3)})
    with pytest.raises(ValueError, match="float64"):
        kernels.selective_scan(**{k: v.double() for k, v in t.items()})


SWEEP = [(L, n, dtype, h0) for L in (1, 7, 128, 2048) for n in (1, 16, 64, 256)
         for dtype, h0 in ((torch.float32, True), (torch.bfloat16, False))]
SWEEP += [(L, 16, torch.float16, True) for L in (1, 7, 128, 2048)]
SWEEP += [(L, 16, torch.bfloat16, True) for L in (7, 128, 2048)]
SWEEP += [(L, 16, torch.float32, False) for L in (7, 2048)]
SWEEP += [(65536, 16, torch.bfloat16, True), (65536, 16, torch.float32, False),
          (65536, 64, torch.float32, True)]


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("L,n,dtype,h0", SWEEP, ids=lambda v: str(v).replace("torch.", ""))
def test_scan_sweep_cuda(L, n, dtype, h0):
    d = 4 if L >= 65536 else 24
    t = scan_inputs(b=2 if L < 65536 else 1, d=d, L=L, n=n, groups=None if L % 2 else 2, dtype=dtype, h0=h0,
                    device="cuda", seed=L + n)
    check_scan(t, softplus=True, tol=TOL[dtype], seed=L * 3 + n)
