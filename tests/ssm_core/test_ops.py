"""ssm_core.ops: the dispatch (forced backends included), and ssm_core's modules on the Triton kernels:
under the interpreter on the CPU (SSM_CORE_BACKEND=triton), natively on the device (tests marked `cuda`)."""
import pytest
import torch

import kernels
import ssm_core
from ssm_core import Mamba2, selective_scan, selective_scan_ref

from ..kernels.helpers import cuda, rel
from .helpers import scan_inputs, stream_in_chunks


def test_dispatch_matches_reference_and_can_be_forced(monkeypatch):
    t = scan_inputs(seed=6)
    ref = selective_scan_ref(**t, delta_softplus=True)
    assert rel(selective_scan(**t, delta_softplus=True), ref) < 1e-5
    monkeypatch.setenv("SSM_CORE_BACKEND", "reference")
    assert ssm_core.backend_for(t["u"]) == "reference"
    assert torch.equal(selective_scan(**t, delta_softplus=True), ref)
    monkeypatch.setenv("SSM_CORE_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="SSM_CORE_BACKEND"):
        selective_scan(**t)


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


def test_mamba2_block_on_triton_backend(monkeypatch):
    pytest.importorskip("kernels.ssd", reason="kernels.ssd needs triton")
    torch.manual_seed(0)
    m = Mamba2(16, d_state=16, headdim=16, chunk_size=16)
    x = torch.randn(2, 37, 16, requires_grad=True)
    y0 = m(x)
    g0 = torch.autograd.grad(y0.square().sum(), [x, *m.parameters()])
    monkeypatch.setenv("SSM_CORE_BACKEND", "triton")
    y = m(x)
    g = torch.autograd.grad(y.square().sum(), [x, *m.parameters()])
    assert rel(y, y0) < 1e-4
    for (name, _), a, b in zip([("x", None), *m.named_parameters()], g, g0):
        assert rel(a, b) < 1e-3, name
    ys, _ = stream_in_chunks(m, x.detach(), [5, 1, 31])
    assert rel(ys, y0) < 1e-4


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


def test_cpu_ssd_runs_in_short_chunks_with_the_result_of_any_chunk(monkeypatch):
    # The CPU backend caps Mamba-2's chunk (its cost is chunk x chunk per head); the result is the chunked
    # scan's at the caller's chunk size, exactly in float64, with the final state too.
    from ssm_core import ops
    from ssm_core.reference import ssd_chunk_scan_ref
    seen = []
    monkeypatch.setattr(ops, "_impl", lambda x, op: lambda *a, **k: seen.append(k["chunk_size"]) or
                        ssd_chunk_scan_ref(*a, **k))
    g = torch.Generator().manual_seed(0)
    b, L, h, p, n = 2, 300, 3, 4, 8
    x = torch.randn(b, L, h, p, generator=g, dtype=torch.float64)
    dt = torch.rand(b, L, h, generator=g, dtype=torch.float64) * 0.2
    A = -torch.rand(h, generator=g, dtype=torch.float64) - 0.5
    B, C = (torch.randn(b, L, 1, n, generator=g, dtype=torch.float64) for _ in range(2))
    h0 = torch.randn(b, h, p, n, generator=g, dtype=torch.float64)
    y, s = ops.ssd_chunk_scan(x, dt, A, B, C, chunk_size=256, initial_states=h0, return_final_states=True)
    want_y, want_s = ssd_chunk_scan_ref(x, dt, A, B, C, chunk_size=256, initial_states=h0, return_final_states=True)
    assert seen == [ops.CPU_SSD_CHUNK] and ops.CPU_SSD_CHUNK < 256
    assert rel(y, want_y) < 1e-12 and rel(s, want_s) < 1e-12
