"""ssm_core: the reference scan against an independent float64 loop (and mamba_ssm's own reference), the Mamba
block's mamba_ssm compatibility, exact streaming, RC equivariance, persistence and input validation."""
import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

import ssm_core
from ssm_core import (
    Mamba,
    MambaConfig,
    MambaLM,
    MambaModel,
    causal_conv1d_ref,
    selective_scan,
    selective_scan_ref,
    selective_state_update_ref,
)
from ssm_core.model import Block
from ssm_core.reference import REF_CHUNK


def naive_scan64(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, h0=None):
    """The recurrence written the obvious way, in float64, one step at a time: the independent oracle."""
    u, delta, A, B, C = (t.double() for t in (u, delta, A, B, C))
    b, d, L = u.shape
    if delta_bias is not None:
        delta = delta + delta_bias.double()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    if B.dim() == 4:  # grouped: channel c uses group c // (d // G)
        B = B.repeat_interleave(d // B.shape[1], dim=1)
        C = C.repeat_interleave(d // C.shape[1], dim=1)
    else:
        B, C = B[:, None], C[:, None]
    h = h0.double() if h0 is not None else u.new_zeros(b, d, A.shape[1])
    ys = []
    for t in range(L):
        h = torch.exp(delta[:, :, t, None] * A) * h + (delta[:, :, t] * u[:, :, t])[..., None] * B[..., t]
        ys.append((h * C[..., t]).sum(-1))
    y = torch.stack(ys, -1)
    if D is not None:
        y = y + u * D.double()[:, None]
    if z is not None:
        y = y * F.silu(z.double())
    return y, h


def scan_inputs(b=2, d=6, L=19, n=5, groups=None, dtype=torch.float32, full=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    bc = (b, n, L) if groups is None else (b, groups, n, L)
    t = dict(u=r(b, d, L), delta=r(b, d, L) * 0.5, A=-torch.rand(d, n, generator=g) * 2 - 0.1,
             B=r(*bc), C=r(*bc))
    if full:
        t.update(D=r(d), z=r(b, d, L), delta_bias=r(d) * 0.3, h0=r(b, d, n))
    return {k: v.to(dtype) if k in ("u", "delta", "B", "C", "z") else v for k, v in t.items()}


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("groups", [None, 2, 6])
@pytest.mark.parametrize("full", [True, False])
def test_reference_scan_matches_naive_float64(groups, full):
    t = scan_inputs(groups=groups, full=full)
    y, h = selective_scan_ref(**t, delta_softplus=full, return_final_state=True)
    y64, h64 = naive_scan64(**t, delta_softplus=full)
    assert y.dtype == torch.float32 and h.dtype == torch.float32
    assert rel(y, y64) < 1e-5 and rel(h, h64) < 1e-5


def test_reference_scan_long_sequence_crosses_chunks():
    t = scan_inputs(b=1, d=3, L=2 * REF_CHUNK + 7, n=4, seed=3)
    y, h = selective_scan_ref(**t, delta_softplus=True, return_final_state=True)
    y64, h64 = naive_scan64(**t, delta_softplus=True)
    assert rel(y, y64) < 1e-5 and rel(h, h64) < 1e-5


def test_reference_scan_gradients_match_naive_float64():
    t = scan_inputs(b=2, d=4, L=11, n=3, groups=2, seed=1)
    t64 = {k: v.double().requires_grad_() for k, v in t.items()}
    t32 = {k: v.clone().requires_grad_() for k, v in t.items()}
    gy = torch.randn(2, 4, 11)
    gh = torch.randn(2, 4, 3)  # the final state is differentiable too
    y, h = selective_scan_ref(**t32, delta_softplus=True, return_final_state=True)
    ((y * gy).sum() + (h * gh).sum()).backward()
    y64, h64 = naive_scan64(**t64, delta_softplus=True)
    ((y64 * gy.double()).sum() + (h64 * gh.double()).sum()).backward()
    for k in t:
        assert t32[k].grad is not None, k
        assert rel(t32[k].grad, t64[k].grad) < 1e-4, k


def test_reference_scan_gradcheck_float64():
    t = {k: v.double().requires_grad_() for k, v in scan_inputs(b=1, d=2, L=5, n=3, seed=2).items()}
    names = list(t)

    def f(*xs):
        y, h = selective_scan_ref(**dict(zip(names, xs)), delta_softplus=True, return_final_state=True)
        return y, h
    assert torch.autograd.gradcheck(f, tuple(t.values()))


@pytest.mark.parametrize("n", [1, 16, 256])
def test_reference_scan_state_sizes(n):
    t = scan_inputs(b=1, d=3, L=6, n=n, seed=n)
    y, h = selective_scan_ref(**t, delta_softplus=True, return_final_state=True)
    y64, h64 = naive_scan64(**t, delta_softplus=True)
    assert h.shape == (1, 3, n) and rel(y, y64) < 1e-5 and rel(h, h64) < 1e-5


def test_reference_scan_bf16_in_bf16_out():
    t = scan_inputs(dtype=torch.bfloat16, seed=4)
    y, h = selective_scan_ref(**t, delta_softplus=True, return_final_state=True)
    y64, h64 = naive_scan64(**t, delta_softplus=True)
    assert y.dtype == torch.bfloat16 and h.dtype == torch.float32
    assert rel(y, y64) < 1e-2 and rel(h, h64) < 1e-5  # accumulation in fp32; only the output is rounded


def test_reference_scan_matches_mamba_ssm_reference(mamba_ssm_cpu):
    t = scan_inputs(b=2, d=8, L=33, n=16, seed=5)
    h0 = t.pop("h0")
    ours = selective_scan_ref(**t, delta_softplus=True, return_final_state=True)
    theirs = mamba_ssm_cpu.selective_scan_ref(**t, delta_softplus=True, return_last_state=True)
    assert rel(ours[0], theirs[0]) < 1e-5 and rel(ours[1], theirs[1]) < 1e-5
    assert h0 is not None


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


@pytest.mark.parametrize("arg,bad,match", [
    ("u", torch.randn(2, 6), r"u: expected shape \(batch, dim, L\)"),
    ("delta", torch.randn(2, 6, 18), r"delta: expected shape \(2, 6, 19\)"),
    ("A", torch.randn(5, 5), r"A: expected shape \(dim=6, N\)"),
    ("B", torch.randn(2, 4, 19), r"B: expected shape \(2, 5, 19\)"),
    ("C", torch.randn(2, 5, 19, 1), r"C: expected shape \(2, 5, 19\)"),
    ("D", torch.randn(5), r"D: expected shape \(6,\)"),
    ("h0", torch.randn(2, 6, 4), r"h0: expected shape \(2, 6, 5\)"),
    ("u", torch.ones(2, 6, 19, dtype=torch.long), r"u: expected a floating-point tensor"),
])
def test_scan_rejects_bad_shapes_with_named_argument(arg, bad, match):
    t = scan_inputs()
    t[arg] = bad
    with pytest.raises(ValueError, match=match):
        selective_scan_ref(**t)


def test_scan_rejects_groups_that_do_not_divide_dim():
    t = scan_inputs(groups=4)
    with pytest.raises(ValueError, match="groups G=4 must divide dim=6"):
        selective_scan_ref(**t)


def test_causal_conv1d_ref_tail_and_chunks():
    x, w, bias = torch.randn(2, 5, 13), torch.randn(5, 4), torch.randn(5)
    full = causal_conv1d_ref(x, w, bias, activation="silu")
    expect = F.silu(F.conv1d(F.pad(x, (3, 0)), w.unsqueeze(1), bias, groups=5))
    assert torch.allclose(full, expect, atol=1e-6)
    tail, outs = None, []
    for s, e in [(0, 1), (1, 3), (3, 4), (4, 13)]:  # chunks shorter than the kernel included
        o, tail = causal_conv1d_ref(x[..., s:e], w, bias, initial_states=tail, return_final_states=True,
                                    activation="silu")
        outs.append(o)
    assert torch.allclose(torch.cat(outs, -1), full, atol=1e-6)


def test_selective_state_update_ref_is_one_scan_step():
    t = scan_inputs(b=2, d=6, L=1, n=5, seed=7)
    y, h = selective_scan_ref(**t, delta_softplus=True, return_final_state=True)
    state = t["h0"].clone()
    y1 = selective_state_update_ref(state, t["u"][..., 0], t["delta"][..., 0], t["A"], t["B"][..., 0], t["C"][..., 0],
                                    D=t["D"], z=t["z"][..., 0], dt_bias=t["delta_bias"], dt_softplus=True)
    assert torch.allclose(y1, y[..., 0], atol=1e-6) and torch.allclose(state, h, atol=1e-6)


# --- the Mamba block ----------------------------------------------------------------------------------------

def test_mamba_parameters_match_mamba_ssm_names_shapes_and_init():
    m = Mamba(64, d_state=16)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {"A_log": (128, 16), "D": (128,), "in_proj.weight": (256, 64), "conv1d.weight": (128, 1, 4),
                      "conv1d.bias": (128,), "x_proj.weight": (4 + 32, 128), "dt_proj.weight": (128, 4),
                      "dt_proj.bias": (128,), "out_proj.weight": (64, 128)}
    assert torch.equal(m.A_log, torch.log(torch.arange(1, 17.0)).repeat(128, 1))
    dt = F.softplus(m.dt_proj.bias)
    assert dt.min() >= 1e-4 * 0.99 and dt.max() <= 0.1 * 1.01  # dt ~ LogUniform(dt_min, dt_max)
    assert m.dt_proj.weight.abs().max() <= 4 ** -0.5


def test_mamba_loads_mamba_ssm_state_dict_and_matches(mamba_ssm_cpu):
    torch.manual_seed(0)
    theirs = mamba_ssm_cpu.Mamba(d_model=32, d_state=8, d_conv=4, expand=2)
    ours = Mamba(32, d_state=8, d_conv=4, expand=2)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 37, 32)
    assert rel(ours(x), theirs(x)) < 1e-5


def _stream(module, x, sizes):
    state = module.init_state(x.shape[0])
    outs, i, k = [], 0, 0
    while i < x.shape[1]:
        n = sizes[k % len(sizes)]
        y, state = module.stream(x[:, i:i + n], state)
        outs.append(y)
        i, k = i + n, k + 1
    return torch.cat(outs, 1)


@pytest.mark.parametrize("sizes", [[1], [3], [64], [1, 5, 2, 17, 3]])
def test_mamba_stream_equals_forward_for_any_chunking(sizes):
    torch.manual_seed(1)
    m = Mamba(24, d_state=8).eval()
    x = torch.randn(2, 70, 24)
    with torch.no_grad():
        full = m(x)
        streamed = _stream(m, x, sizes)
    assert (streamed - full).abs().max().item() <= 1e-5


def test_mamba_lti_ablation_streams_and_ignores_input_for_dynamics():
    torch.manual_seed(2)
    m = Mamba(16, d_state=4, selective=False).eval()
    assert not hasattr(m, "x_proj")
    x = torch.randn(1, 20, 16)
    with torch.no_grad():
        assert (_stream(m, x, [1, 4]) - m(x)).abs().max().item() <= 1e-5


def test_mamba_rejects_bad_input():
    m = Mamba(16)
    with pytest.raises(ValueError, match=r"x: expected shape \(batch, L, d_model=16\)"):
        m(torch.randn(2, 5, 15))
    with pytest.raises(ValueError, match="state: built for batch 3"):
        m.stream(torch.randn(2, 1, 16), m.init_state(3))
    with pytest.raises(ValueError, match="d_state"):
        Mamba(16, d_state=0)


# --- backbone and LM ----------------------------------------------------------------------------------------
DNA_COMPLEMENT = [3, 2, 1, 0, 4, 5]  # A C G T N pad -> T G C A N pad


def test_lm_stream_and_step_decode_equal_forward():
    torch.manual_seed(3)
    lm = MambaLM(MambaConfig(d_model=32, n_layer=3, vocab_size=11)).eval()
    ids = torch.randint(0, 11, (2, 41))
    with torch.no_grad():
        full = lm(ids)
        assert (_stream(lm, ids, [1]) - full).abs().max().item() <= 1e-5
        assert (_stream(lm, ids, [7, 2, 64]) - full).abs().max().item() <= 1e-5


def test_continuous_input_model_streams():
    torch.manual_seed(4)
    m = MambaModel(MambaConfig(d_model=16, n_layer=2, d_input=5)).eval()
    x = torch.randn(3, 30, 5)
    with torch.no_grad():
        assert (_stream(m, x, [4, 1]) - m(x)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("bidirectional", [False, True])
def test_rc_equivariant_lm(bidirectional):
    torch.manual_seed(5)
    lm = MambaLM(MambaConfig(d_model=32, n_layer=2, vocab_size=6, rc_equivariant=True,
                             bidirectional=bidirectional, complement_map=DNA_COMPLEMENT)).eval()
    comp = torch.tensor(DNA_COMPLEMENT)
    ids = torch.randint(0, 5, (2, 50))
    with torch.no_grad():
        out, out_rc = lm(ids), lm(comp[ids].flip(1))
    # logits on the reverse complement = reversed logits with complemented token axis
    assert (out_rc - out.flip(1)[..., comp]).abs().max().item() <= 1e-5
    assert (out_rc - out).abs().max().item() > 1e-3  # and the check is not vacuous


def test_bidirectional_model_sees_the_future_and_refuses_to_stream():
    torch.manual_seed(6)
    lm = MambaLM(MambaConfig(d_model=16, n_layer=1, vocab_size=5, bidirectional=True)).eval()
    ids = torch.randint(0, 5, (1, 20))
    ids2 = ids.clone()
    ids2[0, -1] = (ids[0, -1] + 1) % 5
    with torch.no_grad():
        assert (lm(ids)[0, 0] - lm(ids2)[0, 0]).abs().max() > 0  # position 0 depends on the last token
    with pytest.raises(ValueError, match="bidirectional model .* cannot stream"):
        lm.init_state(1)


def test_causal_model_does_not_see_the_future():
    lm = MambaLM(MambaConfig(d_model=16, n_layer=2, vocab_size=5)).eval()
    ids = torch.randint(0, 5, (1, 20))
    ids2 = ids.clone()
    ids2[0, 10:] = (ids[0, 10:] + 1) % 5
    with torch.no_grad():
        assert torch.equal(lm(ids)[0, :10], lm(ids2)[0, :10])


def test_save_and_load_pretrained_round_trip(tmp_path):
    torch.manual_seed(7)
    lm = MambaLM(MambaConfig(d_model=32, n_layer=2, vocab_size=6, rc_equivariant=True,
                             complement_map=DNA_COMPLEMENT, tie_embeddings=False))
    ids = torch.randint(0, 6, (2, 15))
    lm.save_pretrained(tmp_path / "m")
    lm.save_pretrained(tmp_path / "m")  # overwriting replaces atomically
    back = MambaLM.from_pretrained(tmp_path / "m")
    assert back.config == lm.config
    assert torch.equal(back(ids), lm(ids))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary leftovers
    with pytest.raises(ValueError, match="holds a MambaLM, not a MambaModel"):
        MambaModel.from_pretrained(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        MambaLM.from_pretrained(tmp_path)


def test_tied_embeddings_share_storage():
    lm = MambaLM(MambaConfig(d_model=16, n_layer=1, vocab_size=7))
    assert lm.head_weight() is lm.backbone.embedding.weight


def test_out_proj_rescaled_by_depth():
    torch.manual_seed(0)
    deep = MambaModel(MambaConfig(d_model=64, n_layer=16, vocab_size=5))
    bound = 1 / math.sqrt(128) / math.sqrt(16)  # kaiming_uniform(a=sqrt 5) bound, / sqrt(n_layer)
    w = deep.layers[0].mixer.out_proj.weight
    assert w.abs().max() <= bound * 1.0001 and w.abs().max() > bound * 0.9


def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(8)
    cfg = MambaConfig(d_model=16, n_layer=2, vocab_size=5)
    a = MambaLM(cfg)
    b = MambaLM(MambaConfig(**{**cfg.to_dict(), "gradient_checkpointing": True}))
    b.load_state_dict(a.state_dict())
    ids = torch.randint(0, 5, (2, 12))
    a(ids).sum().backward()
    b(ids).sum().backward()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-6), n


@pytest.mark.parametrize("kwargs,match", [
    (dict(d_model=16, n_layer=1), "set vocab_size"),
    (dict(d_model=16, n_layer=2, vocab_size=5, mixer=["mamba"] * 3), "got 3 names for n_layer=2"),
    (dict(d_model=16, n_layer=1, vocab_size=5, mixer="nope"), "unknown mixer 'nope'"),
    (dict(d_model=16, n_layer=1, vocab_size=5, rc_equivariant=True), "complement_map"),
    (dict(d_model=15, n_layer=1, vocab_size=2, rc_equivariant=True, complement_map=[1, 0]), "must be even"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MambaConfig(**kwargs)


def test_model_rejects_wrong_input_kind():
    m = MambaModel(MambaConfig(d_model=16, n_layer=1, vocab_size=5))
    with pytest.raises(ValueError, match="input_ids: expected integer tensor"):
        m(torch.randn(2, 5))
    c = MambaModel(MambaConfig(d_model=16, n_layer=1, d_input=3))
    with pytest.raises(ValueError, match=r"d_input=3"):
        c(torch.randn(2, 5, 4))


def test_atomic_outputs_get_normal_permissions(tmp_path):
    from ssm_core.io import DIR_MODE, FILE_MODE, write_json_atomic
    write_json_atomic(tmp_path / "m.json", {"a": 1})
    MambaLM(MambaConfig(d_model=8, n_layer=1, vocab_size=4)).save_pretrained(tmp_path / "model")
    assert (tmp_path / "m.json").stat().st_mode & 0o777 == FILE_MODE
    assert (tmp_path / "model").stat().st_mode & 0o777 == DIR_MODE
    assert (tmp_path / "model" / "config.json").stat().st_mode & 0o777 == FILE_MODE


def test_mixer_pattern_is_repeated_over_the_layers():
    cfg = MambaConfig(d_model=16, n_layer=4, vocab_size=5, mixer="mamba, attention")
    assert cfg.layer_mixers() == ["mamba", "attention", "mamba", "attention"]
    assert MambaConfig(d_model=16, n_layer=3, vocab_size=5, mixer=["mamba"]).layer_mixers() == ["mamba"] * 3


# --- residual_in_fp32 (mamba_ssm's option) ------------------------------------------------------------------
def _block_dtypes(model, run) -> set:
    """{(input dtype, output dtype)} of every Block called while run() runs."""
    seen = set()
    hooks = [m.register_forward_hook(lambda _m, args, out: seen.add((args[0].dtype, out.dtype)))
             for m in model.modules() if isinstance(m, Block)]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return seen


@pytest.mark.parametrize("variant", [{}, dict(bidirectional=True), dict(gradient_checkpointing=True),
                                     dict(rc_equivariant=True, complement_map=DNA_COMPLEMENT)],
                         ids=["causal", "bidirectional", "checkpointing", "rc_equivariant"])
def test_residual_in_fp32_sets_the_residual_dtype_of_a_bf16_model(variant):
    torch.manual_seed(9)
    cfg = MambaConfig(d_model=32, n_layer=2, vocab_size=6, **variant)
    fp32_res = MambaLM(cfg).to(torch.bfloat16)                  # the default: float32 residual stream
    bf16_res = MambaLM(dataclasses.replace(cfg, residual_in_fp32=False)).to(torch.bfloat16)
    bf16_res.load_state_dict(fp32_res.state_dict())
    ids = torch.randint(0, 5, (2, 40))
    out = {}

    def train_step(model):   # training mode with a backward: the checkpointing variant recomputes
        def run():
            out[model] = model(ids)
            out[model].float().square().mean().backward()
        return run

    assert _block_dtypes(fp32_res, train_step(fp32_res)) == {(torch.float32, torch.float32)}
    assert _block_dtypes(bf16_res, train_step(bf16_res)) == {(torch.bfloat16, torch.bfloat16)}
    assert all(torch.isfinite(p.grad).all() for p in bf16_res.parameters())
    logits = out[bf16_res]
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    assert rel(logits, out[fp32_res]) < 0.03     # both bf16 models; measured ~0.005


def test_without_residual_in_fp32_autocast_keeps_the_embeddings_dtype():
    """fp32 parameters under bf16 autocast: a token embedding gives float32 (so the stream stays float32, as
    in mamba_ssm), a continuous input's Linear projection gives bf16 (so the stream is bf16)."""
    torch.manual_seed(13)
    lm = MambaLM(MambaConfig(d_model=16, n_layer=2, vocab_size=5, residual_in_fp32=False))
    enc = MambaModel(MambaConfig(d_model=16, n_layer=2, d_input=3, residual_in_fp32=False))
    with torch.autocast("cpu", torch.bfloat16):
        assert _block_dtypes(lm, lambda: lm(torch.randint(0, 5, (2, 10)))) == {(torch.float32, torch.float32)}
        assert _block_dtypes(enc, lambda: enc(torch.randn(2, 10, 3))) == {(torch.bfloat16, torch.bfloat16)}


@pytest.mark.parametrize("mixer", ["mamba", "mamba,attention"])
def test_stream_equals_forward_without_residual_in_fp32(mixer):
    torch.manual_seed(10)
    lm = MambaLM(MambaConfig(d_model=32, n_layer=2, vocab_size=11, mixer=mixer, residual_in_fp32=False)).eval()
    ids = torch.randint(0, 11, (2, 41))
    with torch.no_grad():
        full = lm(ids)
        for sizes in ([1], [7, 2, 64]):   # the CPU step path (residual added in out_proj) and the chunked scan
            assert (_stream(lm, ids, sizes) - full).abs().max().item() <= 1e-5


def test_bf16_stream_keeps_the_bf16_residual(monkeypatch):
    torch.manual_seed(11)
    lm = MambaLM(MambaConfig(d_model=32, n_layer=2, vocab_size=11, mixer="mamba,attention",
                             residual_in_fp32=False)).to(torch.bfloat16).eval()
    seen, block_stream = set(), Block.stream

    def recording(self, residual, state):
        out = block_stream(self, residual, state)
        seen.add((residual.dtype, out[0].dtype))
        return out

    monkeypatch.setattr(Block, "stream", recording)
    ids = torch.randint(0, 11, (2, 41))
    with torch.no_grad():
        full, streamed = lm(ids), _stream(lm, ids, [1, 7, 20])
    assert seen == {(torch.bfloat16, torch.bfloat16)}
    assert streamed.dtype == torch.bfloat16 and rel(streamed, full) < 0.03


def test_config_saved_without_residual_in_fp32_loads(tmp_path):
    torch.manual_seed(12)
    assert MambaConfig.from_dict({"d_model": 16, "n_layer": 1, "vocab_size": 5}).residual_in_fp32 is True
    lm = MambaLM(MambaConfig(d_model=16, n_layer=1, vocab_size=5))
    lm.save_pretrained(tmp_path / "old")
    path = tmp_path / "old" / "config.json"
    meta = json.loads(path.read_text())
    del meta["config"]["residual_in_fp32"]          # as written before the option existed
    path.write_text(json.dumps(meta))
    back = MambaLM.from_pretrained(tmp_path / "old")
    ids = torch.randint(0, 5, (2, 9))
    assert back.config.residual_in_fp32 is True and torch.equal(back(ids), lm(ids))
    MambaLM(MambaConfig(d_model=16, n_layer=1, vocab_size=5, residual_in_fp32=False)).save_pretrained(tmp_path / "new")
    assert MambaLM.from_pretrained(tmp_path / "new").config.residual_in_fp32 is False
