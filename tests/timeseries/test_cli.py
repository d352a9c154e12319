"""fit -> predict -> backtest round trip on a tiny model, and bad input giving one clear line."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ssm_core.cli import run
from timeseries.backtest import BacktestConfig
from timeseries.backtest import main as backtest_main
from timeseries.data import synthetic_frame
from timeseries.fit import main as fit_main
from timeseries.predict import PredictConfig
from timeseries.predict import main as predict_main
from timeseries.train import FitConfig

from ..helpers import REPO

TINY = ["--lookback", "24", "--horizon", "8", "--model.d_model", "8", "--model.n_layer", "1",
        "--model.d_state", "4", "--max-epochs", "2", "--batch-size", "32", "--no-progress"]
METRIC_KEYS = {"test_mse", "test_mae", "test_mse_original", "test_mae_original"}


@pytest.fixture(scope="module")
def small_csv(tmp_path_factory):
    path = tmp_path_factory.mktemp("csv") / "series.csv"
    synthetic_frame(n_rows=400, n_series=2, seed=1).to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def fitted(small_csv, tmp_path_factory):
    out = tmp_path_factory.mktemp("fit") / "run"
    assert run(fit_main, FitConfig, ["--csv", str(small_csv), "--output-dir", str(out), *TINY,
                                     "--forecaster.quantiles", "0.1", "0.5", "0.9"]) == 0
    return out


def test_fit_writes_metrics_forecast_plot_model(fitted):
    metrics = json.loads((fitted / "metrics.json").read_text())
    assert METRIC_KEYS <= set(metrics)
    assert set(metrics["baselines"]) == {"repeat_last", "seasonal_naive", "dlinear", "rlinear"}
    for m in [metrics, *metrics["baselines"].values()]:
        assert METRIC_KEYS <= set(m) and all(np.isfinite(m[k]) for k in METRIC_KEYS)
    # 400 rows, ratios 0.7/0.1/0.2: the test split is rows [400 - 80 - 24, 400): every window counted.
    assert metrics["data"]["windows"]["test"] == metrics["n_windows"] == 80 - 8 + 1
    assert metrics["baselines"]["repeat_last"]["n_windows"] == 73
    forecast = pd.read_csv(fitted / "forecast.csv")
    assert len(forecast) == 8 and {"series_0_actual", "series_0_forecast", "series_1_q0.9"} <= set(forecast)
    assert (fitted / "forecast.png").stat().st_size > 1000
    assert (fitted / "model" / "model.safetensors").is_file()
    # Quantile outputs: no closed-form linear part, so a Mamba trial is chosen; its Lightning checkpoints stay.
    chosen = metrics["selection"]["chosen"]
    assert chosen["correction"] and Path(chosen["checkpoints"]).parent == fitted / "search"
    assert (Path(chosen["checkpoints"]) / "checkpoints" / "best.ckpt").is_file()


def test_residual_in_fp32_flag_reaches_the_backbone():
    from ssm_core.cli import parse_config
    from timeseries.models import build_model
    for argv, expected in (([], True), (["--model.residual_in_fp32", "false"], False)):
        cfg = parse_config(FitConfig, [*argv, *TINY])
        assert build_model(cfg.forecaster_config(2)).backbone.config.residual_in_fp32 is expected


def test_predict_forecasts_the_next_horizon(fitted, small_csv, tmp_path):
    out = tmp_path / "pred.csv"
    assert run(predict_main, PredictConfig, ["--model", str(fitted), "--csv", str(small_csv),
                                             "--output", str(out)]) == 0
    pred = pd.read_csv(out, parse_dates=["date"])
    last = pd.to_datetime(pd.read_csv(small_csv)["date"]).iloc[-1]
    assert list(pred["date"]) == list(pd.date_range(last, periods=9, freq="h")[1:])
    assert {"series_0", "series_1", "series_0_q0.1", "series_0_q0.9"} <= set(pred)
    assert np.isfinite(pred[["series_0", "series_1"]].to_numpy()).all()


def test_predict_is_the_models_forecast_of_the_last_window(fitted, small_csv, tmp_path):
    """Predicting from a CSV cut at row r equals the model applied to rows [r-L, r) scaled at fit time."""
    import torch

    from timeseries.persistence import load_forecaster
    saved = load_forecaster(fitted)
    df = pd.read_csv(small_csv).iloc[:300]
    df.to_csv(tmp_path / "cut.csv", index=False)
    assert run(predict_main, PredictConfig, ["--model", str(fitted), "--csv", str(tmp_path / "cut.csv"),
                                             "--output", str(tmp_path / "p.csv")]) == 0
    values = df[["series_0", "series_1"]].to_numpy()
    x = torch.tensor((values[-24:] - saved.mean) / saved.scale, dtype=torch.float32)[None]
    with torch.no_grad():
        median = saved.model(x)[0, :, :, 1].numpy() * saved.scale + saved.mean
    got = pd.read_csv(tmp_path / "p.csv")[["series_0", "series_1"]].to_numpy()
    np.testing.assert_allclose(got, median, rtol=1e-4, atol=1e-4)


def test_backtest_rolls_the_origin(fitted, small_csv, tmp_path):
    assert run(backtest_main, BacktestConfig, ["--model", str(fitted), "--csv", str(small_csv), "--folds", "3",
                                               "--output-dir", str(tmp_path)]) == 0
    folds = pd.read_csv(tmp_path / "backtest.csv", parse_dates=["origin"])
    assert len(folds) == 3
    dates = pd.to_datetime(pd.read_csv(small_csv)["date"])
    assert list(folds["origin"]) == [dates.iloc[400 - 8 - k * 8] for k in (2, 1, 0)]
    assert not folds["in_training_period"].any()
    assert (tmp_path / "backtest.png").is_file()


def _bad(tmp_path, df, name):
    p = tmp_path / f"{name}.csv"
    df.to_csv(p, index=False)
    return str(p)


@pytest.mark.parametrize("case, message", [
    ("missing", "no such file"),
    ("no_numeric", "no numeric columns"),
    ("unknown_target", "--target nope: no such numeric column"),
    ("too_short", "fewer than --lookback 24 + --horizon 8"),
    ("unsorted", "not strictly increasing"),
])
def test_bad_input_one_line_exit_2(tmp_path, capsys, case, message):
    df = synthetic_frame(n_rows=200, n_series=2)
    args = {  # each case writes its own file: the dict is built eagerly
        "missing": ["--csv", str(tmp_path / "absent.csv")],
        "no_numeric": ["--csv", _bad(tmp_path, df[["date"]].assign(site="a"), "no_numeric")],
        "unknown_target": ["--csv", _bad(tmp_path, df, "ok"), "--target", "nope"],
        "too_short": ["--csv", _bad(tmp_path, df.iloc[:20], "short")],
        "unsorted": ["--csv", _bad(tmp_path, df.iloc[::-1], "unsorted")],
    }[case]
    assert run(fit_main, FitConfig, [*args, "--output-dir", str(tmp_path / "out"), *TINY]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0], err


def test_config_yaml_of_a_fit_gives_its_config(fitted):
    from ssm_core.cli import parse_config
    cfg = parse_config(FitConfig, ["--config", str(fitted / "config.yaml")])
    assert cfg.forecaster.quantiles == [0.1, 0.5, 0.9] and cfg.model.d_model == 8 and cfg.lookback == 24
    # patch tokens (the default): the patch length follows the lookback (24 -> 8), a causal scan
    assert cfg.model.d_input == 8 and cfg.model.bidirectional is False
    variate = parse_config(FitConfig, ["--config", str(fitted / "config.yaml"), "--forecaster.token", "variate"])
    assert variate.model.d_input == 24 and variate.model.bidirectional is True  # variate tokens: the lookback
    assert cfg.optim.schedule == "exponential" and cfg.optim.lr_decay == 0.5
    again = parse_config(FitConfig, ["--csv", cfg.csv, "--output-dir", cfg.output_dir, *TINY,
                                     "--forecaster.quantiles", "0.1", "0.5", "0.9"])
    assert cfg == again


def test_patch_tokens_set_the_backbone_input():
    from ssm_core.cli import parse_config
    cfg = parse_config(FitConfig, [*TINY, "--forecaster.token", "patch", "--forecaster.patch_len", "6"])
    assert cfg.model.d_input == 6 and cfg.model.bidirectional is False


def test_search_settings_are_unset_by_default_and_fixed_by_their_nested_flags():
    from ssm_core.cli import parse_config
    cfg = parse_config(FitConfig, [])
    assert (cfg.lookback, cfg.model.d_model, cfg.model.n_layer, cfg.optim.lr, cfg.forecaster.loss) == (None,) * 5
    cfg = parse_config(FitConfig, ["--lookback", "48", "--model.d_model", "16", "--model.n_layer", "3",
                                   "--optim.lr", "5e-4", "--forecaster.loss", "mae"])
    assert (cfg.lookback, cfg.model.d_model, cfg.model.n_layer, cfg.optim.lr, cfg.forecaster.loss) == (
        48, 16, 3, 5e-4, "mae")
    fc = cfg.forecaster_config(2)
    assert fc.backbone.d_model == 16 and fc.backbone.n_layer == 3 and fc.options.patch_len == 8
    from ssm_core.cli import UserError
    with pytest.raises(UserError, match="--optim.lr: must be > 0"):
        parse_config(FitConfig, ["--optim.lr", "0"])


def test_old_flat_flags_name_their_new_spelling(capsys):
    for old, new in (("--model", "--forecaster.kind"), ("--d-model", "--model.d_model"),
                     ("--lr-decay", "--optim.lr_decay"), ("--quantiles", "--forecaster.quantiles"),
                     ("--token", "--forecaster.token"), ("--loss", "--forecaster.loss"), ("--lr", "--optim.lr"),
                     ("--n-layer", "--model.n_layer"), ("--patch-len", "--forecaster.patch_len")):
        assert run(fit_main, FitConfig, [old, "1"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"{old}: moved to {new}" in err[0], err
    assert run(fit_main, FitConfig, ["--forecaster.quantiles", "0.1", "0.9"]) == 2
    assert "--forecaster.quantiles: include 0.5" in capsys.readouterr().err


def test_predict_bad_model_folder(tmp_path, capsys):
    assert run(predict_main, PredictConfig, ["--model", str(tmp_path), "--csv", "x.csv"]) == 2
    assert "not a fitted model" in capsys.readouterr().err


def test_module_entry_point_exits_2_without_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "timeseries.fit", "--csv", str(tmp_path / "nope.csv"),
                        "--output-dir", str(tmp_path / "o")], capture_output=True, text=True, cwd=REPO, check=False)
    assert r.returncode == 2
    expected = f"python -m timeseries.fit: error: --csv {tmp_path / 'nope.csv'}: no such file"
    assert r.stderr.strip().splitlines() == [expected]
