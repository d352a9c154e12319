"""The other mixers: Mamba-2, S4D (FFT convolution vs recurrence), causal attention with its KV cache, and
streaming == forward for every mixer and for hybrid stacks."""
import math

import pytest
import torch
import torch.nn.functional as F

from ssm_core import S4D, Attention, Mamba2, MambaConfig, MambaLM, MambaModel, hybrid_mixers
from ssm_core.attention import KVCache

from .helpers import rel, stream_in_chunks


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
        y, _ = stream_in_chunks(mixer, x, sizes)
        torch.testing.assert_close(y, y_full, rtol=1e-9, atol=1e-9, msg=f"{name} chunks {sizes}")


@pytest.mark.parametrize("name", ["mamba2", "s4d-inv", "attention-window"])
def test_mixer_stream_float32(name):
    torch.manual_seed(1)
    mixer = MIXER_FACTORIES[name]()
    x = torch.randn(2, 30, 16)
    y, _ = stream_in_chunks(mixer, x, [4, 1, 25])
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


@pytest.mark.parametrize("window", [None, 4])
def test_attention_pads_head_dim_for_the_memory_efficient_kernels(monkeypatch, window):
    """head_dim 5 goes to SDPA as 8 (else CUDA falls back to materialising every score); the result is the
    explicit softmax of the unpadded heads, scaled by 1/sqrt(5), offline and streamed."""
    from ssm_core import attention
    torch.manual_seed(0)
    m = Attention(10, num_heads=2, window=window, rotary=False).double()
    x = torch.randn(2, 11, 10, dtype=torch.float64)
    q, k, v = m.in_proj(x).view(2, 11, 3, 2, 5).permute(2, 0, 3, 1, 4)
    i, j = torch.arange(11)[:, None], torch.arange(11)[None, :]
    keep = (j <= i) & ((i - j < window) if window else True)
    scores = (q @ k.transpose(-1, -2) / math.sqrt(5)).masked_fill(~keep, -math.inf)
    expected = m.out_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 11, 10))
    sdpa, head_dims = attention.F.scaled_dot_product_attention, []
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention",
                        lambda q, *a, **kw: head_dims.append(q.shape[-1]) or sdpa(q, *a, **kw))
    torch.testing.assert_close(m(x), expected, rtol=1e-12, atol=1e-12)
    streamed, _ = stream_in_chunks(m, x, [4, 1, 6])
    torch.testing.assert_close(streamed, expected, rtol=1e-12, atol=1e-12)
    assert head_dims and set(head_dims) == {8}


@pytest.mark.parametrize("window", [None, 5])
def test_attention_stream_in_query_blocks_equals_one_call(monkeypatch, window):
    """A chunk's queries go through SDPA in blocks when the score matrix would be large (a long cache):
    the result is the one-call result (queries are independent)."""
    from ssm_core import attention
    torch.manual_seed(0)
    m = Attention(16, num_heads=2, window=window).double()
    x = torch.randn(3, 23, 16, dtype=torch.float64)
    whole, _ = stream_in_chunks(m, x, [9, 14])
    monkeypatch.setattr(attention, "STREAM_SCORES", 3 * 2 * 23 * 4)     # 4 queries against 23 keys
    sdpa, calls = attention.F.scaled_dot_product_attention, []
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", lambda q, *a, **k: calls.append(q.shape[2])
                        or sdpa(q, *a, **k))
    blocked, _ = stream_in_chunks(m, x, [9, 14])
    assert calls == [9, 4, 4, 4, 2]     # the first chunk (9 keys) fits the budget; the second (23 keys) does not
    torch.testing.assert_close(blocked, whole, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(blocked, m(x), rtol=1e-10, atol=1e-10)


def test_kv_cache_memory_is_bounded_by_window():
    torch.manual_seed(0)
    full, windowed = Attention(16, num_heads=2), Attention(16, num_heads=2, window=4)
    x = torch.randn(3, 10, 16)
    _, s_full = stream_in_chunks(full, x, [6, 4])
    _, s_win = stream_in_chunks(windowed, x, [6, 4])
    assert isinstance(s_full, KVCache) and s_full.pos == 10 and s_win.pos == 10
    assert s_full.k.shape == (3, 2, 10, 8) and s_win.k.shape == (3, 2, 4, 8)
    assert s_full.nbytes() == 2 * 3 * 10 * 16 * 4 and s_win.nbytes() == 2 * 3 * 4 * 16 * 4


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
