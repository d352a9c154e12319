"""Forecaster shapes, RevIN's shift equivariance, the quantile head and loss, the naive baselines."""
import pytest
import torch

from ssm_core import MambaConfig
from timeseries.models import (
    ForecasterConfig,
    ForecasterOptions,
    MambaForecaster,
    build_model,
    pinball_loss,
    point_forecast,
    repeat_last,
    seasonal_naive,
)

TINY = {"n_series": 3, "lookback": 24, "horizon": 8}
BACKBONE = {"d_model": 16, "n_layer": 1, "d_state": 4}
OPTIONS = {"patch_len": 8, "patch_stride": 4}


def forecaster_config(**options) -> ForecasterConfig:
    lookback = options.pop("lookback", TINY["lookback"])
    return ForecasterConfig(**{**TINY, "lookback": lookback}, options=ForecasterOptions(**{**OPTIONS, **options}),
                            backbone=MambaConfig(**BACKBONE, d_input=1))


@pytest.mark.parametrize("kw", [{"token": "variate"}, {"token": "patch"}, {"kind": "dlinear"},
                                {"token": "variate", "quantiles": [0.1, 0.5, 0.9]},
                                {"token": "patch", "quantiles": [0.5, 0.9], "linear_skip": False}])
def test_shapes_and_gradients(kw):
    cfg = forecaster_config(**kw)
    model = build_model(cfg)
    x = torch.randn(5, 24, 3)
    y = model(x)
    expected = (5, 8, 3, len(cfg.quantiles)) if cfg.quantiles else (5, 8, 3)
    assert y.shape == expected
    y.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("token", ["variate", "patch"])
def test_revin_makes_forecasts_shift_and_scale_equivariant(token):
    torch.manual_seed(0)
    model = MambaForecaster(forecaster_config(token=token)).eval()
    x = torch.randn(4, 24, 3)
    shift, scale = torch.tensor([5.0, -3.0, 100.0]), torch.tensor([2.0, 0.5, 10.0])
    with torch.no_grad():
        y = model(x)
        y2 = model(x * scale + shift)
    torch.testing.assert_close(y2, y * scale + shift, rtol=1e-4, atol=1e-3)


def test_variate_tokens_mix_series_but_patches_do_not():
    torch.manual_seed(0)
    x = torch.randn(2, 24, 3)
    x2 = x.clone()
    x2[..., 2] += torch.randn(2, 24)  # change series 2 only
    for token, mixes in (("variate", True), ("patch", False)):
        model = MambaForecaster(forecaster_config(token=token)).eval()
        with torch.no_grad():
            changed = (model(x)[..., 0] - model(x2)[..., 0]).abs().max().item()
        assert (changed > 1e-6) == mixes, token


def test_pinball_loss():
    target = torch.tensor([1.0, 2.0, 3.0])
    pred = torch.tensor([[0.0], [2.0], [5.0]])
    # q = 0.5: half the absolute error
    assert pinball_loss(pred, target, [0.5]).item() == pytest.approx(0.5 * (1 + 0 + 2) / 3)
    # q = 0.9: under-forecasts cost 0.9 per unit, over-forecasts 0.1
    assert pinball_loss(pred, target, [0.9]).item() == pytest.approx((0.9 * 1 + 0 + 0.1 * 2) / 3)
    q = torch.stack([pred[:, 0] - 1, pred[:, 0]], -1)
    assert torch.equal(point_forecast(q, [0.1, 0.5]), pred[:, 0])


def test_quantile_config_checks():
    with pytest.raises(ValueError, match="include 0.5"):
        forecaster_config(quantiles=[0.1, 0.9])
    with pytest.raises(ValueError, match="in \\(0, 1\\)"):
        forecaster_config(quantiles=[0.5, 1.5])
    with pytest.raises(ValueError, match="--forecaster.patch_len 48: longer than --lookback 24"):
        forecaster_config(patch_len=48, token="patch")


def test_naive_baselines():
    x = torch.arange(10, dtype=torch.float32).reshape(1, 10, 1)
    assert repeat_last(x, 3).flatten().tolist() == [9, 9, 9]
    assert seasonal_naive(x, 5, 4).flatten().tolist() == [6, 7, 8, 9, 6]
    assert seasonal_naive(x, 2, 20).flatten().tolist() == [9, 9]  # season longer than the lookback


def test_dlinear_starts_at_the_history_mean():
    model = build_model(forecaster_config(kind="dlinear"))
    x = torch.randn(2, 24, 3)
    torch.testing.assert_close(model(x), x.mean(1, keepdim=True).expand(-1, 8, -1), rtol=1e-4, atol=1e-5)
