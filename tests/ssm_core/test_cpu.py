"""The fast CPU path (ssm_core/cpu.py) against the pure-PyTorch reference: forward, every gradient, h0 and
the final state, grouped B/C, odd lengths and chunk boundaries; and the streaming path against forward."""
import pytest
import torch

import ssm_core
from ssm_core import cpu
from ssm_core.reference import selective_scan_ref


def _inputs(b, d, n, L, groups=None, dtype=torch.float64, seed=0, dt_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    bc = (b, n, L) if groups is None else (b, groups, n, L)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    return dict(u=r(b, d, L), delta=r(b, d, L) * dt_scale, A=-torch.rand(d, n, generator=g, dtype=dtype) * 2,
                B=r(*bc), C=r(*bc), D=r(d), z=r(b, d, L), delta_bias=r(d), h0=r(b, d, n))


def _run(fn, x, grad_keys, softplus=True, loss_on_state=True):
    """Forward with return_final_state, then gradients of a loss touching y (non-uniform weights) and h."""
    x = {k: v.detach().clone().requires_grad_(k in grad_keys) for k, v in x.items()}
    y, h = fn(x["u"], x["delta"], x["A"], x["B"], x["C"], D=x["D"], z=x["z"], delta_bias=x["delta_bias"],
              delta_softplus=softplus, h0=x["h0"], return_final_state=True)
    w = torch.linspace(-1, 2, y.shape[-1], dtype=y.dtype)
    loss = (y * w).sum() + ((h * h).sum() if loss_on_state else 0)
    grads = torch.autograd.grad(loss, [x[k] for k in grad_keys])
    return [y, h, *grads]


ALL = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "h0"]


def _assert_close(got, want, rtol, atol):
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"output {i}: {m}")


@pytest.mark.parametrize("chunk_elems", [1, 40, 1 << 18])   # T = 1, a few steps (L not a multiple), all of L
@pytest.mark.parametrize("L", [1, 13, 32])
@pytest.mark.parametrize("groups", [None, 2])
def test_scan_matches_reference_float64(monkeypatch, chunk_elems, L, groups):
    monkeypatch.setattr(cpu, "CHUNK_ELEMS", chunk_elems)
    x = _inputs(2, 4, 3, L, groups)
    _assert_close(_run(cpu.selective_scan, x, ALL), _run(selective_scan_ref, x, ALL), 1e-10, 1e-10)


@pytest.mark.parametrize("softplus", [True, False])
def test_scan_optional_arguments(softplus):
    """D, z, delta_bias and h0 absent; no final state requested."""
    x = _inputs(2, 6, 4, 19)
    kw = dict(delta_softplus=softplus)
    delta = x["delta"].abs() if not softplus else x["delta"]
    got = cpu.selective_scan(x["u"], delta, x["A"], x["B"], x["C"], **kw)
    want = selective_scan_ref(x["u"], delta, x["A"], x["B"], x["C"], **kw)
    assert got.shape == want.shape and got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_gradient_through_final_state_only(monkeypatch):
    monkeypatch.setattr(cpu, "CHUNK_ELEMS", 30)
    x = _inputs(1, 5, 3, 11)

    def state_only(fn):
        v = {k: t.detach().clone().requires_grad_() for k, t in x.items()}
        _, h = fn(v["u"], v["delta"], v["A"], v["B"], v["C"], delta_bias=v["delta_bias"], delta_softplus=True,
                  h0=v["h0"], return_final_state=True)
        return torch.autograd.grad((h ** 3).sum(), [v[k] for k in ("u", "delta", "A", "B", "delta_bias", "h0")],
                                   allow_unused=True)

    for a, b in zip(state_only(cpu.selective_scan), state_only(selective_scan_ref)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_gradcheck(monkeypatch):
    monkeypatch.setattr(cpu, "CHUNK_ELEMS", 12)  # 2-step chunks: the carried adjoint crosses boundaries
    x = _inputs(1, 3, 2, 5, groups=3)
    names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "h0"]

    def f(*args):
        v = dict(zip(names, args))
        y, h = cpu.selective_scan(v["u"], v["delta"], v["A"], v["B"], v["C"], D=v["D"], z=v["z"],
                                  delta_bias=v["delta_bias"], delta_softplus=True, h0=v["h0"],
                                  return_final_state=True)
        return y, h

    assert torch.autograd.gradcheck(f, tuple(x[k].requires_grad_() for k in names))


def test_float32_long_sequence_close_to_reference():
    x = _inputs(2, 8, 8, 150, dtype=torch.float32, seed=1)
    _assert_close(_run(cpu.selective_scan, x, ALL), _run(selective_scan_ref, x, ALL), 2e-4, 2e-4)


def test_extreme_decays_stay_finite():
    """Large dt*A (fast forgetting) and dt near zero: the recurrence never exponentiates a positive
    cumulative sum, so nothing overflows where the reference does not."""
    x = _inputs(1, 4, 3, 40, seed=2)
    x["A"] = x["A"] * 100
    x["delta"][..., :20] *= 20
    x["delta"][..., 20:] = -30.0
    got, want = _run(cpu.selective_scan, x, ALL), _run(selective_scan_ref, x, ALL)
    assert all(torch.isfinite(t).all() for t in got)
    _assert_close(got, want, 1e-9, 1e-9)


def test_half_precision_inputs():
    x = _inputs(1, 8, 4, 24, dtype=torch.float32, seed=3)
    args = [x[k].bfloat16() for k in ("u", "delta", "A", "B", "C")]
    y, h = cpu.selective_scan(*args, delta_softplus=True, return_final_state=True)
    y_ref, h_ref = selective_scan_ref(*args, delta_softplus=True, return_final_state=True)
    assert y.dtype == torch.bfloat16 and h.dtype == torch.float32
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=1e-5)


def test_dispatch_routes_cpu_tensors_here(monkeypatch):
    monkeypatch.delenv("SSM_CORE_BACKEND", raising=False)
    x = torch.zeros(1, 2, 3)
    assert ssm_core.backend_for(x) == "cpu"
    calls = []
    monkeypatch.setattr(cpu, "selective_scan", lambda *a, **k: calls.append(1) or "fast")
    assert ssm_core.selective_scan(x, x, torch.zeros(2, 1), torch.zeros(1, 1, 3), torch.zeros(1, 1, 3)) == "fast"


def test_bad_shapes_name_the_argument():
    x = _inputs(1, 4, 3, 5)
    with pytest.raises(ValueError, match="B"):
        cpu.selective_scan(x["u"], x["delta"], x["A"], x["B"][..., :4], x["C"])


def test_matches_mamba_ssm_reference(mamba_ssm_cpu):
    """An independent oracle: the official pure-PyTorch selective_scan_ref (skips without ../shared)."""
    x = _inputs(2, 8, 4, 37, dtype=torch.float32, seed=5)
    kw = dict(D=x["D"], z=x["z"], delta_bias=x["delta_bias"], delta_softplus=True, return_last_state=True)
    y_off, h_off = mamba_ssm_cpu.selective_scan_ref(x["u"], x["delta"], x["A"], x["B"], x["C"], **kw)
    y, h = cpu.selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], D=x["D"], z=x["z"],
                              delta_bias=x["delta_bias"], delta_softplus=True, return_final_state=True)
    torch.testing.assert_close(y, y_off, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h, h_off, rtol=1e-5, atol=1e-5)


# --- streaming ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunks", [[1] * 9, [2, 2, 2, 3], [4, 1, 3, 1], [9]])
def test_mamba_stream_equals_forward(chunks):
    torch.manual_seed(0)
    m = ssm_core.Mamba(16, d_state=4).double().eval()
    x = torch.randn(2, sum(chunks), 16, dtype=torch.float64)
    with torch.no_grad():
        want = m(x)
        state = m.init_state(2)
        conv, ssm = state.conv, state.ssm
        outs, s = [], 0
        for n in chunks:
            y, state = m.stream(x[:, s:s + n], state)
            outs.append(y)
            s += n
    assert state.conv is conv and state.ssm is ssm, "the state must be updated in place"
    torch.testing.assert_close(torch.cat(outs, 1), want, rtol=1e-10, atol=1e-10)


def test_model_stream_equals_forward_float32():
    torch.manual_seed(0)
    cfg = ssm_core.MambaConfig(d_model=32, n_layer=2, d_input=3, d_state=8)
    model = ssm_core.MambaModel(cfg).eval()
    x = torch.randn(1, 12, 3)
    with torch.no_grad():
        want = model(x)
        state = model.init_state(1)
        got = torch.cat([model.stream(x[:, s:s + 2], state)[0] for s in range(0, 12, 2)], 1)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)



def test_short_cpu_chunks_take_the_step_path(monkeypatch):
    m = ssm_core.Mamba(8, d_state=4).eval()
    calls = []
    real = cpu.stream_steps
    monkeypatch.setattr(cpu, "stream_steps", lambda *a: calls.append(a[1].shape[1]) or real(*a))
    with torch.inference_mode():
        state = m.init_state(1)
        for n in (1, 2, 20):
            m.stream(torch.randn(1, n, 8), state)
        assert calls == [1, 2], "chunks up to STREAM_STEPS stream step by step, longer ones use the scan"
        monkeypatch.setenv("SSM_CORE_BACKEND", "reference")
        m.stream(torch.randn(1, 2, 8), state)
    assert calls == [1, 2], "a backend forced to the reference streams through the reference"


def _streamed(m, x, T):
    state = m.init_state(x.shape[0])
    return torch.cat([m.stream(x[:, s:s + T], state)[0] for s in range(0, x.shape[1], T)], 1)


def test_stream_weight_cache_follows_parameter_changes():
    """The step path caches derived weights (transposes, conv taps, A log2 e, the dt_proj bias row) keyed on
    the parameters: every way of changing them must be seen by the next chunk."""
    torch.manual_seed(0)
    m = ssm_core.Mamba(16, d_state=4).eval()
    x = torch.randn(2, 8, 16)

    def check():
        with torch.inference_mode():
            torch.testing.assert_close(_streamed(m, x, 2), m(x), rtol=1e-5, atol=1e-5)

    check()
    opt = torch.optim.SGD(m.parameters(), lr=0.5)     # in place, under autograd: version counters move
    m(x).pow(2).sum().backward()
    opt.step()
    check()
    other = ssm_core.Mamba(16, d_state=4)
    m.load_state_dict(other.state_dict())            # copy_ into the same tensors
    check()
    m.x_proj.weight = torch.nn.Parameter(torch.randn_like(m.x_proj.weight))   # a new parameter object
    check()
    with torch.no_grad():
        m.conv1d.weight.data = torch.randn_like(m.conv1d.weight)  # new storage under the same parameter
        m.A_log.data = m.A_log.data + 0.5
    check()
    m.double()
    with torch.inference_mode():
        torch.testing.assert_close(_streamed(m, x.double(), 2), m(x.double()), rtol=1e-10, atol=1e-10)


def test_stream_of_a_model_built_in_inference_mode():
    """Inference tensors have no version counter: such a model streams without the cache, still exactly."""
    torch.manual_seed(0)
    with torch.inference_mode():
        m = ssm_core.Mamba(16, d_state=4).eval()
        x = torch.randn(1, 6, 16)
        torch.testing.assert_close(_streamed(m, x, 2), m(x), rtol=1e-5, atol=1e-5)
        m.in_proj.weight.mul_(2)                      # in place, unseen by any version counter
        torch.testing.assert_close(_streamed(m, x, 2), m(x), rtol=1e-5, atol=1e-5)


def test_stream_steps_reuse_scratch_and_return_fresh_outputs():
    """The step path writes into scratch buffers kept in the state (no allocation a call but the output),
    and the output it returns is never one of them: a later chunk must not overwrite an earlier result."""
    torch.manual_seed(0)
    m = ssm_core.Mamba(16, d_state=4).eval()
    x = torch.randn(1, 4, 16)
    with torch.inference_mode():
        state = m.init_state(1)
        y1, _ = m.stream(x[:, :2], state)
        kept = y1.clone()
        buffers = {k: v.data_ptr() for k, v in vars(state.scratch[2]).items() if isinstance(v, torch.Tensor)}
        y2, _ = m.stream(x[:, 2:], state)
        assert torch.equal(y1, kept), "the second chunk overwrote the first chunk's output"
        assert buffers == {k: v.data_ptr() for k, v in vars(state.scratch[2]).items() if isinstance(v, torch.Tensor)}
        assert y2.data_ptr() not in buffers.values()
        torch.testing.assert_close(torch.cat([y1, y2], 1), m(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_streaming_rmsnorm_equals_the_module_with_gradients(dtype):
    """Block.stream's 5-op RMSNorm (`_stream_norm`): the module's values and gradients (streaming under
    autograd goes through it too), and the module itself for the half types it leaves to it."""
    from ssm_core.model import RMSNorm, _stream_norm
    torch.manual_seed(0)
    norm = RMSNorm(16).to(dtype)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2)
    x = (torch.randn(2, 3, 16, dtype=dtype) * 4).requires_grad_()
    want, got = norm(x), _stream_norm(norm, x)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got, want, **tol)
    for a, b in zip(torch.autograd.grad(got.pow(3).sum(), [x, norm.weight]),
                    torch.autograd.grad(want.pow(3).sum(), [x, norm.weight])):
        torch.testing.assert_close(a, b, **tol)
    xb = x.detach().bfloat16()
    assert torch.equal(_stream_norm(norm.bfloat16(), xb), norm(xb))


def test_stream_under_autograd_matches_forward_gradients():
    """Streaming with autograd on (truncated BPTT) takes the differentiable scan; gradients equal forward's."""
    torch.manual_seed(0)
    m = ssm_core.Mamba(8, d_state=4).double()
    x = torch.randn(1, 6, 8, dtype=torch.float64)
    want = torch.autograd.grad(m(x).pow(2).sum(), list(m.parameters()))
    state = m.init_state(1)
    ys = [m.stream(x[:, s:s + 2], state)[0] for s in range(0, 6, 2)]
    got = torch.autograd.grad(torch.cat(ys, 1).pow(2).sum(), list(m.parameters()))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-8)
