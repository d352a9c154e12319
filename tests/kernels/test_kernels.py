"""The Triton kernels against the float64 reference (ssm_core.reference), forward and every gradient.

On the CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py): tiny
shapes, every code path (options on/off, grouped B/C, padded N, several checkpoint segments, L = 1).
Tests marked `cuda` are the device sweep (L up to 65536, N up to 256, fp32/bf16/fp16, h0 on/off):
    pytest tests/kernels -m cuda
Tolerances (relative Frobenius error vs float64): fp32 1e-4, bf16/fp16 1e-2.
"""
from __future__ import annotations

import pytest
import torch

import kernels
import ssm_core
from kernels import ScanConfig
from ssm_core.reference import (
    causal_conv1d_ref,
    mamba_inner_ref,
    rms_norm_ref,
    selective_scan_ref,
    selective_state_update_ref,
)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device)")
TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}
SCAN_ARGS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "h0")


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all(), "non-finite values"
    if ref.norm() == 0:  # e.g. d(A) at L = 1 without h0: exactly zero, so compare absolutely
        return out.double().norm().item()
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-300)).item()


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


# --------------------------------------------------------------------------------------------------------
# CPU: Triton interpreter, tiny shapes
# --------------------------------------------------------------------------------------------------------
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


@pytest.mark.parametrize("K,init,act,bias",
                         [(4, True, "silu", True), (4, False, None, False), (3, True, None, True)])
def test_causal_conv1d_matches_reference_cpu(K, init, act, bias, L=9):
    b, d = 2, 3
    g = torch.Generator().manual_seed(K)
    args = [torch.randn(b, d, L, generator=g), torch.randn(d, K, generator=g),
            torch.randn(d, generator=g) if bias else None,
            torch.randn(b, d, K - 1, generator=g) if init else None]
    a_k = [x.clone().requires_grad_() if x is not None else None for x in args]
    a_r = [x.double().requires_grad_() if x is not None else None for x in args]
    kw = dict(return_final_states=True, activation=act)
    out, tail = kernels.causal_conv1d(*a_k[:3], initial_states=a_k[3], **kw)
    out_r, tail_r = causal_conv1d_ref(*a_r[:3], initial_states=a_r[3], **kw)
    assert rel(out, out_r) < 1e-5 and torch.equal(tail.double(), tail_r)
    go, gt = torch.randn_like(out_r), torch.randn_like(tail_r)
    ((out.double() * go).sum() + (tail.double() * gt).sum()).backward()
    ((out_r * go).sum() + (tail_r * gt).sum()).backward()
    for x_k, x_r in zip(a_k, a_r):
        if x_k is not None:
            assert rel(x_k.grad, x_r.grad) < 1e-5


def test_causal_conv1d_spans_cpu(monkeypatch):
    # One 32-step tile per program: 75 steps are three programs along L (windows, the next steps' dpre and
    # the carried tail's gradient cross program boundaries), a partial last tile.
    monkeypatch.setattr(kernels.conv, "FWD_SPAN", 1)
    monkeypatch.setattr(kernels.conv, "BWD_SPAN", 1)
    test_causal_conv1d_matches_reference_cpu(4, True, "silu", True, L=75)


@pytest.mark.parametrize("groups", [None, 2])
def test_selective_state_update_matches_reference_cpu(groups):
    b, d, n = 3, 6, 5
    g = torch.Generator().manual_seed(7)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    bc = (b, n) if groups is None else (b, groups, n)
    state, x, dt, A = r(b, d, n), r(b, d), r(b, d), -torch.rand(d, n, generator=g)
    B, C, D, z, bias = r(*bc), r(*bc), r(d), r(b, d), r(d)
    s_k, s_r = state.clone(), state.double()
    y = kernels.selective_state_update(s_k, x, dt, A, B, C, D=D, z=z, dt_bias=bias, dt_softplus=True)
    y_r = selective_state_update_ref(s_r, *(v.double() for v in (x, dt, A, B, C)), D=D.double(), z=z.double(),
                                     dt_bias=bias.double(), dt_softplus=True)
    assert rel(y, y_r) < 1e-5 and rel(s_k, s_r) < 1e-5  # state updated in place


def test_mamba_streams_on_the_kernels_cpu(monkeypatch):
    """With the Triton backend forced, Mamba's forward, chunked stream and one-token steps all run on the
    kernels and agree with the reference backend."""
    torch.manual_seed(0)
    m = ssm_core.Mamba(d_model=4, d_state=4, expand=2)
    x = torch.randn(1, 6, 4)
    y_ref = m(x)
    monkeypatch.setenv("SSM_CORE_BACKEND", "triton")
    assert ssm_core.backend_for(x) == "triton"
    calls = []
    for op in ("selective_scan", "causal_conv1d", "selective_state_update", "mamba_inner"):
        fn = getattr(kernels, op)
        monkeypatch.setattr(kernels, op, lambda *a, _fn=fn, _op=op, **k: calls.append(_op) or _fn(*a, **k))
    assert rel(m(x), y_ref) < 1e-5
    state = m.init_state(1)
    outs = [m.stream(x[:, s:e], state)[0] for s, e in ((0, 3), (3, 4), (4, 6))]
    assert rel(torch.cat(outs, 1), y_ref) < 1e-5
    assert set(calls) == {"selective_scan", "causal_conv1d", "selective_state_update", "mamba_inner"}


def test_backbone_fuses_norm_and_residual_on_the_kernels_cpu(monkeypatch):
    """On the kernels, each Mamba block of the backbone is one mamba_inner call with its pre-norm's weight
    (norm, mixer and residual add fused) and the LM's logits and gradients equal the unfused composition on
    the CPU backend."""
    torch.manual_seed(0)
    lm = ssm_core.MambaLM(ssm_core.MambaConfig(d_model=8, n_layer=2, vocab_size=12, d_state=4, expand=2))
    ids = torch.randint(0, 12, (2, 7))

    def run():
        lm.zero_grad(set_to_none=True)
        logits = lm(ids)
        (logits * torch.linspace(-1, 1, logits.numel()).view_as(logits)).sum().backward()
        return logits.detach(), {k: p.grad.clone() for k, p in lm.named_parameters()}

    y_ref, g_ref = run()
    monkeypatch.setenv("SSM_CORE_BACKEND", "triton")
    norms = []
    fn = kernels.mamba_inner
    monkeypatch.setattr(kernels, "mamba_inner", lambda *a, _fn=fn, **k: norms.append(a[12]) or _fn(*a, **k))
    y, g = run()
    assert len(norms) == 2 and all(w is lm.backbone.layers[i].norm.weight for i, w in enumerate(norms))
    assert rel(y, y_ref) < 1e-5
    errs = {k: rel(g[k], g_ref[k]) for k in g_ref}
    assert all(e < 1e-4 for e in errs.values()), errs


def mamba_inner_params(d_model, d_inner, n, r, K=4, biases=False, device="cpu", seed=0, norm=False):
    g = torch.Generator(device=device).manual_seed(seed)
    r_ = lambda *s: torch.randn(*s, generator=g, device=device)  # noqa: E731
    return dict(in_proj_weight=r_(2 * d_inner, d_model) / d_model ** 0.5,
                in_proj_bias=r_(2 * d_inner) * 0.1 if biases else None,
                conv_weight=r_(d_inner, K) * 0.5, conv_bias=r_(d_inner) * 0.1,
                x_proj_weight=r_(r + 2 * n, d_inner) / d_inner ** 0.5, dt_proj_weight=r_(d_inner, r) / r ** 0.5,
                dt_proj_bias=r_(d_inner) * 0.3 - 2, A=-torch.rand(d_inner, n, generator=g, device=device) * 2 - 0.1,
                D=r_(d_inner), out_proj_weight=r_(d_model, d_inner) / d_inner ** 0.5,
                out_proj_bias=r_(d_model) * 0.1 if biases else None,
                norm_weight=1 + 0.2 * r_(d_model) if norm else None)


def check_mamba_inner(b, L, d_model, d_inner, n, r, biases, device, dtype, tol, seed=0, norm=False):
    """kernels.mamba_inner (fp32 parameters, `dtype` autocast on CUDA) vs mamba_inner_ref in float64: the
    output and the gradient of the input and of every parameter. With `norm`, the pre-norm residual block
    (x an fp32 residual stream, RMSNorm weight among the parameters)."""
    p = mamba_inner_params(d_model, d_inner, n, r, biases=biases, device=device, seed=seed, norm=norm)
    x = torch.randn(b, L, d_model, device=device, generator=torch.Generator(device=device).manual_seed(seed + 1))
    p_k = {k: v.clone().requires_grad_() for k, v in p.items() if v is not None}
    p_r = {k: v.double().requires_grad_() for k, v in p.items() if v is not None}
    x_k, x_r = x.clone().requires_grad_(), x.double().requires_grad_()
    with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        y = kernels.mamba_inner(x_k, **{k: p_k.get(k) for k in p})
    y_r = mamba_inner_ref(x_r, **{k: p_r.get(k) for k in p})
    assert y.shape == y_r.shape and rel(y, y_r) < tol
    gy = torch.randn(y_r.shape, device=device, dtype=torch.float64,
                     generator=torch.Generator(device=device).manual_seed(seed + 2))
    (y.double() * gy).sum().backward()
    (y_r * gy).sum().backward()
    errs = {k: rel(p_k[k].grad, p_r[k].grad) for k in p_k} | {"x": rel(x_k.grad, x_r.grad)}
    assert all(p_k[k].grad.dtype == torch.float32 for k in p_k)
    limit = dict.fromkeys(errs, tol)
    if dtype != torch.float32:
        # Half-precision GEMMs over the whole block round more than one kernel does: the bound is then the
        # error of the same block composed from the separately tested ops under the same autocast.
        p_c = {k: v.clone().requires_grad_() for k, v in p.items() if v is not None}
        x_c = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=dtype):
            y_c = mamba_inner_ref(x_c, **{k: p_c.get(k) for k in p}, scan=kernels.selective_scan,
                                  conv=kernels.causal_conv1d, norm=kernels.rms_norm)
        (y_c.double() * gy).sum().backward()
        comp = {k: rel(p_c[k].grad, p_r[k].grad) for k in p_c} | {"x": rel(x_c.grad, x_r.grad)}
        limit = {k: max(tol, 1.5 * comp[k]) for k in errs}
    assert all(errs[k] < limit[k] for k in errs), (errs, limit)


@pytest.mark.parametrize("biases,norm", [(False, False), (True, False), (True, True)])
def test_mamba_inner_matches_reference_cpu(biases, norm):
    """The fused block (one layout, no copies, conv and delta recomputed in the backward; with `norm` the
    pre-norm residual block, its normalised input recomputed too) equals the composition of reference ops,
    output and every gradient (interpreter, tiny shapes, 2 chunks + tail)."""
    check_mamba_inner(b=2, L=19, d_model=6, d_inner=8, n=4, r=3, biases=biases, device="cpu",
                      dtype=torch.float32, tol=1e-4, norm=norm)


def check_rms_norm(shape, in_dtype, out_dtype, device, tol):
    g = torch.Generator(device=device).manual_seed(0)
    x = (torch.randn(*shape, generator=g, device=device) * 3).to(in_dtype)
    w = torch.randn(shape[-1], generator=g, device=device)
    x_k, w_k = x.clone().requires_grad_(), w.clone().requires_grad_()
    x_r, w_r = x.double().requires_grad_(), w.double().requires_grad_()
    y = kernels.rms_norm(x_k, w_k, 1e-5, out_dtype=out_dtype)
    y_r = rms_norm_ref(x_r, w_r, 1e-5)
    assert y.dtype == out_dtype and rel(y, y_r) < tol
    gy = torch.randn(y_r.shape, generator=g, device=device, dtype=torch.float64)
    (y.double() * gy).sum().backward()
    (y_r * gy).sum().backward()
    assert x_k.grad.dtype == in_dtype and rel(x_k.grad, x_r.grad) < tol and rel(w_k.grad, w_r.grad) < tol


@pytest.mark.parametrize("shape,in_dtype,out_dtype", [((3, 5, 24), torch.float32, torch.float32),
                                                      ((37, 6), torch.float32, torch.bfloat16)])
def test_rms_norm_matches_reference_cpu(shape, in_dtype, out_dtype):
    """Rows padded to a power of two and several programs; a float32 residual normalised into bf16."""
    check_rms_norm(shape, in_dtype, out_dtype, "cpu", 1e-5 if out_dtype == torch.float32 else 1e-2)


def test_model_streams_on_the_kernels_cpu(monkeypatch):
    """A two-layer MambaModel streamed in chunks with the Triton backend forced (the general stream path of
    Block.stream, residual added by Mamba.stream) equals its forward on the reference backend."""
    torch.manual_seed(0)
    m = ssm_core.MambaModel(ssm_core.MambaConfig(d_model=4, n_layer=2, d_state=4, vocab_size=5)).eval()
    tokens = torch.randint(0, 5, (1, 6))
    with torch.no_grad():
        y_ref = m(tokens)
        monkeypatch.setenv("SSM_CORE_BACKEND", "triton")
        calls = []
        scan = kernels.selective_scan
        monkeypatch.setattr(kernels, "selective_scan", lambda *a, **k: calls.append(1) or scan(*a, **k))
        state = m.init_state(1)
        outs = [m.stream(tokens[:, s:e], state)[0] for s, e in ((0, 3), (3, 4), (4, 6))]
    assert rel(torch.cat(outs, 1), y_ref) < 1e-5
    assert calls                                   # the chunks went through the kernels


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


# --------------------------------------------------------------------------------------------------------
# CUDA: the device sweep
# --------------------------------------------------------------------------------------------------------
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


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_conv_and_state_update_cuda(dtype):
    b, d, L, K, n = 2, 96, 1000, 4, 16
    x = torch.randn(b, d, L, device="cuda", dtype=dtype)
    w, bias, init = torch.randn(d, K, device="cuda"), torch.randn(d, device="cuda"), torch.randn(b, d, K - 1,
                                                                                                  device="cuda")
    args = [x, w, bias, init.to(dtype)]
    a_k = [v.clone().requires_grad_() for v in args]
    a_r = [v.double().requires_grad_() for v in args]
    out = kernels.causal_conv1d(*a_k[:3], initial_states=a_k[3], activation="silu")
    out_r = causal_conv1d_ref(*a_r[:3], initial_states=a_r[3], activation="silu")
    assert rel(out, out_r) < TOL[dtype]
    go = torch.randn_like(out_r)
    (out.double() * go).sum().backward()
    (out_r * go).sum().backward()
    assert max(rel(p.grad, q.grad) for p, q in zip(a_k, a_r)) < TOL[dtype]
    state = torch.randn(b, d, n, device="cuda")
    xs, dt, z = (torch.randn(b, d, device="cuda", dtype=dtype) for _ in range(3))
    A, B, C = -torch.rand(d, n, device="cuda"), torch.randn(b, n, device="cuda", dtype=dtype), torch.randn(
        b, n, device="cuda", dtype=dtype)
    s_k, s_r = state.clone(), state.double()
    y = kernels.selective_state_update(s_k, xs, dt, A, B, C, D=w[:, 0], z=z, dt_bias=bias, dt_softplus=True)
    y_r = selective_state_update_ref(s_r, *(v.double() for v in (xs, dt, A, B, C)), D=w[:, 0].double(),
                                     z=z.double(), dt_bias=bias.double(), dt_softplus=True)
    assert rel(y, y_r) < TOL[dtype] and rel(s_k, s_r) < 1e-4


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype,L,norm", [(torch.float32, 2048, False), (torch.bfloat16, 4096, False),
                                          (torch.bfloat16, 65536, False), (torch.float32, 2048, True),
                                          (torch.bfloat16, 4096, True)])
def test_mamba_inner_cuda(dtype, L, norm):
    check_mamba_inner(b=2 if L < 65536 else 1, L=L, d_model=64, d_inner=128, n=16, r=4, biases=True,
                      device="cuda", dtype=dtype, tol=TOL[dtype], norm=norm)


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("shape,in_dtype,out_dtype", [((4, 1000, 256), torch.float32, torch.bfloat16),
                                                      ((3, 77, 1536), torch.bfloat16, torch.bfloat16),
                                                      ((5, 40), torch.float32, torch.float32)])
def test_rms_norm_cuda(shape, in_dtype, out_dtype):
    check_rms_norm(shape, in_dtype, out_dtype, "cuda", 1e-5 if out_dtype == torch.float32 else 1e-2)


@cuda
@pytest.mark.cuda
def test_mamba_block_cuda_matches_reference_and_streams():
    torch.manual_seed(0)
    m = ssm_core.Mamba(d_model=64, d_state=16).cuda()
    x = torch.randn(2, 300, 64, device="cuda", requires_grad=True)
    y = m(x)
    y.square().sum().backward()
    g_k = [p.grad.clone() for p in m.parameters()] + [x.grad.clone()]
    m.zero_grad()
    x.grad = None
    m64 = m.double()
    x64 = x.detach().double().requires_grad_()
    y_r = m64(x64)  # float64 routes to the reference
    y_r.square().sum().backward()
    g_r = [p.grad for p in m64.parameters()] + [x64.grad]
    assert rel(y, y_r) < 1e-4
    assert max(rel(a, b) for a, b in zip(g_k, g_r)) < 1e-4
    m = m.float()
    with torch.no_grad():
        y = m(x)
        state = m.init_state(2)
        outs = [m.stream(x[:, s:e], state)[0] for s, e in ((0, 100), (100, 101), (101, 102), (102, 300))]
    assert rel(torch.cat(outs, 1), y) < 1e-4
