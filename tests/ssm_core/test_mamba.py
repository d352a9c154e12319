"""ssm_core.Mamba: mamba_ssm's parameters and outputs, exact streaming for any chunking, the time-invariant
ablation and input validation."""
import pytest
import torch
import torch.nn.functional as F

from ssm_core import Mamba

from .helpers import rel, stream


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


@pytest.mark.parametrize("sizes", [[1], [3], [64], [1, 5, 2, 17, 3]])
def test_mamba_stream_equals_forward_for_any_chunking(sizes):
    torch.manual_seed(1)
    m = Mamba(24, d_state=8).eval()
    x = torch.randn(2, 70, 24)
    with torch.no_grad():
        full = m(x)
        streamed = stream(m, x, sizes)
    assert (streamed - full).abs().max().item() <= 1e-5


def test_mamba_lti_ablation_streams_and_ignores_input_for_dynamics():
    torch.manual_seed(2)
    m = Mamba(16, d_state=4, selective=False).eval()
    assert not hasattr(m, "x_proj")
    x = torch.randn(1, 20, 16)
    with torch.no_grad():
        assert (stream(m, x, [1, 4]) - m(x)).abs().max().item() <= 1e-5


def test_mamba_rejects_bad_input():
    m = Mamba(16)
    with pytest.raises(ValueError, match=r"x: expected shape \(batch, L, d_model=16\)"):
        m(torch.randn(2, 5, 15))
    with pytest.raises(ValueError, match="state: built for batch 3"):
        m.stream(torch.randn(2, 1, 16), m.init_state(3))
    with pytest.raises(ValueError, match="d_state"):
        Mamba(16, d_state=0)
