"""ssm_core.reference: the selective scan against an independent float64 loop (and mamba_ssm's own
reference), the conv and the decoding step, and Mamba-2's chunked SSD against its step-by-step recurrence,
gradients included; input validation that names the argument."""
import pytest
import torch
import torch.nn.functional as F

from ssm_core import causal_conv1d_ref, selective_scan_ref, selective_state_update_ref, ssd_chunk_scan_ref
from ssm_core.reference import REF_CHUNK

from .helpers import rel, scan_inputs, ssd_inputs


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
