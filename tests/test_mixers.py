"""The mixer family: Mamba-2's chunked SSD (reference vs an independent float64 loop, gradients included),
the Triton SSD fast path vs the reference (CPU interpreter here, the GPU on the device), S4D (FFT convolution
vs recurrence), causal attention with its KV cache, and streaming == forward for every mixer and for hybrids."""
import math

import pytest
import torch
import torch.nn.functional as F

from ssm_core import (
    S4D,
    Attention,
    Mamba2,
    MambaConfig,
    MambaLM,
    MambaModel,
    hybrid_mixers,
    ssd_chunk_scan_ref,
)
from ssm_core.attention import KVCache


def naive_ssd64(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, initial_states=None):
    """The Mamba-2 recurrence one step at a time in float64: the oracle the chunked form must match."""
    x, dt, A, B, C = (t.double() for t in (x, dt, A, B, C))
    b, L, h, p = x.shape
    if dt_bias is not None:
        dt = dt + dt_bias.double()
    if dt_softplus:
        dt = F.softplus(dt)
    rep = h // B.shape[2]
    B, C = B.repeat_interleave(rep, 2), C.repeat_interleave(rep, 2)
    H = initial_states.double() if initial_states is not None else x.new_zeros(b, h, p, B.shape[-1])
    ys = []
    for t in range(L):
        a = torch.exp(dt[:, t] * A)[:, :, None, None]
        H = a * H + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]
        ys.append((H * C[:, t, :, None, :]).sum(-1))
    y = torch.stack(ys, 1)
    if D is not None:
        D = D.double()
        y = y + x * (D[:, None] if D.dim() == 1 else D)
    if z is not None:
        y = y * F.silu(z.double())
    return y, H


def ssd_inputs(b=2, L=45, h=4, p=6, g=2, n=5, dtype=torch.float64, full=True, D_hdim=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    t = dict(x=r(b, L, h, p), dt=r(b, L, h) - 1.0, A=-torch.rand(h, generator=gen, dtype=torch.float64) * 2 - 0.2,
             B=r(b, L, g, n), C=r(b, L, g, n))
    if full:
        t.update(D=r(h, p) if D_hdim else r(h), z=r(b, L, h, p), dt_bias=r(h) * 0.3, initial_states=r(b, h, p, n))
    return {k: v.to(dtype) if k in ("x", "B", "C", "z") else v for k, v in t.items()}


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# --- the SSD reference ------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [1, 8, 16, 64])
@pytest.mark.parametrize("full,D_hdim", [(True, False), (True, True), (False, False)])
def test_ssd_reference_matches_recurrence(chunk, full, D_hdim):
    t = ssd_inputs(full=full, D_hdim=D_hdim)
    y, H = ssd_chunk_scan_ref(**t, chunk_size=chunk, dt_softplus=full, return_final_states=True)
    y0, H0 = naive_ssd64(**t, dt_softplus=full)
    assert y.dtype == torch.float64 and H.shape == H0.shape
    torch.testing.assert_close(y, y0, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(H, H0, rtol=1e-10, atol=1e-10)


def test_ssd_reference_gradients_match_recurrence():
    t = {k: v.clone().requires_grad_() for k, v in ssd_inputs(L=21).items()}
    y, H = ssd_chunk_scan_ref(**t, chunk_size=8, dt_softplus=True, return_final_states=True)
    gy, gH = torch.randn_like(y), torch.randn_like(H)
    grads = torch.autograd.grad((y * gy).sum() + (H * gH).sum(), list(t.values()))
    y0, H0 = naive_ssd64(**t, dt_softplus=True)
    grads0 = torch.autograd.grad((y0 * gy).sum() + (H0 * gH).sum(), list(t.values()))
    for name, g, g0 in zip(t, grads, grads0):
        torch.testing.assert_close(g, g0, rtol=1e-9, atol=1e-9, msg=f"grad of {name}")


def test_ssd_reference_splits_into_chunks_with_state():
    t = ssd_inputs(L=40)
    y_full, H_full = ssd_chunk_scan_ref(**t, chunk_size=16, dt_softplus=True, return_final_states=True)
    state, ys = t["initial_states"], []
    for s, e in ((0, 1), (1, 17), (17, 40)):
        part = {k: (v[:, s:e] if k in ("x", "dt", "B", "C", "z") else v) for k, v in t.items()}
        part["initial_states"] = state
        y, state = ssd_chunk_scan_ref(**part, chunk_size=16, dt_softplus=True, return_final_states=True)
        ys.append(y)
    torch.testing.assert_close(torch.cat(ys, 1), y_full, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(state, H_full, rtol=1e-10, atol=1e-10)


def test_ssd_reference_rejects_bad_shapes():
    t = ssd_inputs(full=False)
    with pytest.raises(ValueError, match="ngroups=3 must divide nheads=4"):
        ssd_chunk_scan_ref(t["x"], t["dt"], t["A"], torch.zeros(2, 45, 3, 5), torch.zeros(2, 45, 3, 5))
    with pytest.raises(ValueError, match="initial_states: expected shape"):
        ssd_chunk_scan_ref(**t, initial_states=torch.zeros(2, 4, 6, 4))


# --- the Triton fast path (interpreter on CPU) ------------------------------------------------------------
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
    ys, _ = _stream_in_chunks(m, x.detach(), [5, 1, 31])
    assert rel(ys, y0) < 1e-4


# --- Mamba-2 block ------------------------------------------------------------------------------------------
def test_mamba2_parameters_follow_mamba_ssm():
    m = Mamba2(32, d_state=8, headdim=16, ngroups=2)
    d_inner, nheads = 64, 4
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {"in_proj.weight": (2 * d_inner + 2 * 2 * 8 + nheads, 32), "conv1d.weight": (96, 1, 4),
                      "conv1d.bias": (96,), "dt_bias": (nheads,), "A_log": (nheads,), "D": (nheads,),
                      "norm.weight": (d_inner,), "out_proj.weight": (32, d_inner)}
    dt = F.softplus(m.dt_bias)
    assert ((dt > 0.9e-3) & (dt < 0.11)).all()
    assert ((-m.A_log.exp() <= -1) & (-m.A_log.exp() >= -16)).all()


def test_mamba2_headdim_must_divide():
    with pytest.raises(ValueError, match="headdim"):
        Mamba2(24, headdim=20)


def _stream_in_chunks(mixer, x, sizes):
    state = mixer.init_state(x.shape[0])
    outs, s = [], 0
    for n in sizes:
        y, state = mixer.stream(x[:, s:s + n], state)
        outs.append(y)
        s += n
    assert s == x.shape[1]
    return torch.cat(outs, 1), state


MIXER_FACTORIES = {
    "mamba2": lambda: Mamba2(16, d_state=8, headdim=8, ngroups=2, chunk_size=8),
    "mamba2-gated-D-hdim": lambda: Mamba2(16, d_state=8, headdim=8, rmsnorm=False, D_has_hdim=True, chunk_size=4),
    "s4d-inv": lambda: S4D(16, d_state=8, init="inv"),
    "s4d-lin": lambda: S4D(16, d_state=8, init="lin"),
    "attention": lambda: Attention(16, num_heads=2),
    "attention-window": lambda: Attention(16, num_heads=2, window=5),
    "attention-norope": lambda: Attention(16, num_heads=4, rotary=False),
}


@pytest.mark.parametrize("name", sorted(MIXER_FACTORIES))
def test_mixer_stream_equals_forward(name):
    torch.manual_seed(0)
    mixer = MIXER_FACTORIES[name]().double()
    x = torch.randn(2, 23, 16, dtype=torch.float64)
    y_full = mixer(x)
    for sizes in ([23], [1] * 23, [3, 1, 7, 12], [9, 14]):
        y, _ = _stream_in_chunks(mixer, x, sizes)
        torch.testing.assert_close(y, y_full, rtol=1e-9, atol=1e-9, msg=f"{name} chunks {sizes}")


@pytest.mark.parametrize("name", ["mamba2", "s4d-inv", "attention-window"])
def test_mixer_stream_float32(name):
    torch.manual_seed(1)
    mixer = MIXER_FACTORIES[name]()
    x = torch.randn(2, 30, 16)
    y, _ = _stream_in_chunks(mixer, x, [4, 1, 25])
    assert rel(y, mixer(x)) < 1e-5


def test_mixers_are_causal():
    torch.manual_seed(0)
    x = torch.randn(1, 20, 16, dtype=torch.float64)
    x2 = x.clone()
    x2[:, 12:] = torch.randn(1, 8, 16, dtype=torch.float64)
    for name, make in MIXER_FACTORIES.items():
        m = make().double()
        torch.testing.assert_close(m(x)[:, :12], m(x2)[:, :12], msg=name)
        assert not torch.allclose(m(x)[:, 12:], m(x2)[:, 12:]), name


# --- S4D ----------------------------------------------------------------------------------------------------
def test_s4d_kernel_matches_recurrence():
    torch.manual_seed(0)
    m = S4D(4, d_state=6).double()
    L = 17
    K = m.kernel(L, torch.float64)
    dtA, dB, C = m._discrete(torch.float64)
    s = torch.zeros(4, 3, dtype=torch.complex128)
    impulse = []
    for t in range(L):  # impulse response of the recurrence
        s = torch.exp(dtA) * s + dB * (1.0 if t == 0 else 0.0)
        impulse.append(2 * (C * s).sum(-1).real)
    torch.testing.assert_close(K, torch.stack(impulse, -1), rtol=1e-10, atol=1e-12)


def test_s4d_initialisations():
    lin, inv = S4D(2, d_state=8, init="lin"), S4D(2, d_state=8, init="inv")
    n = torch.arange(4, dtype=torch.float32)
    torch.testing.assert_close(lin.A_imag[0], math.pi * n)
    torch.testing.assert_close(inv.A_imag[0], 8 / math.pi * (8 / (2 * n + 1) - 1))
    torch.testing.assert_close(-lin.log_A_real.exp(), torch.full((2, 4), -0.5))
    with pytest.raises(ValueError, match="d_state"):
        S4D(2, d_state=7)
    with pytest.raises(ValueError, match="init"):
        S4D(2, init="legs")


# --- attention -----------------------------------------------------------------------------------------------
def test_attention_matches_explicit_softmax_with_window():
    torch.manual_seed(0)
    m = Attention(8, num_heads=2, window=3, rotary=False).double()
    x = torch.randn(1, 9, 8, dtype=torch.float64)
    q, k, v = m.in_proj(x).view(1, 9, 3, 2, 4).permute(2, 0, 3, 1, 4)
    scores = q @ k.transpose(-1, -2) / 2.0
    i, j = torch.arange(9)[:, None], torch.arange(9)[None, :]
    scores = scores.masked_fill(~((j <= i) & (i - j < 3)), -math.inf)
    o = (scores.softmax(-1) @ v).transpose(1, 2).reshape(1, 9, 8)
    torch.testing.assert_close(m(x), m.out_proj(o))


def test_kv_cache_memory_is_bounded_by_window():
    torch.manual_seed(0)
    full, windowed = Attention(16, num_heads=2), Attention(16, num_heads=2, window=4)
    x = torch.randn(3, 10, 16)
    _, s_full = _stream_in_chunks(full, x, [6, 4])
    _, s_win = _stream_in_chunks(windowed, x, [6, 4])
    assert isinstance(s_full, KVCache) and s_full.pos == 10 and s_win.pos == 10
    assert s_full.k.shape == (3, 2, 10, 8) and s_win.k.shape == (3, 2, 4, 8)
    assert s_full.nbytes() == 2 * 3 * 10 * 16 * 4 and s_win.nbytes() == 2 * 3 * 4 * 16 * 4


# --- hybrid stacks ---------------------------------------------------------------------------------------
def hybrid_config(**kw):
    return MambaConfig(d_model=16, n_layer=4, vocab_size=11, d_state=8,
                       mixer=["mamba", "mamba2", "s4d", "attention"],
                       mixer_options={"mamba2": {"headdim": 8, "chunk_size": 4}, "attention": {"num_heads": 2,
                                                                                               "window": 6}}, **kw)


def test_hybrid_lm_streams_and_trains(tmp_path):
    torch.manual_seed(0)
    model = MambaLM(hybrid_config()).double()
    kinds = [type(layer.mixer).__name__ for layer in model.backbone.layers]
    assert kinds == ["Mamba", "Mamba2", "S4D", "Attention"]
    ids = torch.randint(0, 11, (2, 19))
    logits = model(ids)
    state = model.init_state(2)
    outs = []
    for s, e in ((0, 5), (5, 6), (6, 19)):
        y, state = model.stream(ids[:, s:e], state)
        outs.append(y)
    torch.testing.assert_close(torch.cat(outs, 1), logits, rtol=1e-9, atol=1e-9)
    loss = F.cross_entropy(logits.flatten(0, 1), ids.flatten())
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    model.save_pretrained(tmp_path / "m")
    again = MambaLM.from_pretrained(tmp_path / "m").double()
    torch.testing.assert_close(again(ids), logits)


def test_every_8th_layer_attention_with_continuous_input():
    assert hybrid_mixers(8, base="mamba2") == ["mamba2"] * 7 + ["attention"]
    assert hybrid_mixers(6, every=3) == ["mamba", "mamba", "attention"] * 2
    cfg = MambaConfig(d_model=16, n_layer=8, d_input=3, d_state=4, mixer=hybrid_mixers(8, base="mamba2"),
                      mixer_options={"mamba2": {"headdim": 8}})
    model = MambaModel(cfg)
    assert [type(layer.mixer).__name__ for layer in model.layers].count("Attention") == 1
    assert model(torch.randn(2, 10, 3)).shape == (2, 10, 16)


def test_unknown_mixer_option_is_a_clear_error():
    with pytest.raises(TypeError, match="unexpected keyword"):
        MambaModel(MambaConfig(d_model=16, n_layer=1, vocab_size=5, mixer="s4d", mixer_options={"s4d": {"bogus": 1}}))
