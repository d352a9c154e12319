"""The default recipe's selection (timeseries/autofit.py): it reads training and validation rows only, the
closed-form linear map is the RevIN-linear forecaster it claims to be, and the choices follow the data."""
import json

import numpy as np
import pandas as pd
import pytest
import torch

from ssm_core import MambaConfig
from ssm_core.cli import parse_config, run
from timeseries import autofit
from timeseries.data import prepare, split_borders, table_from_frame
from timeseries.fit import main as fit_main
from timeseries.models import ForecasterConfig, ForecasterOptions, build_model, repeat_last
from timeseries.train import FitConfig


def frame(n=700, seed=0, kind="seasonal"):
    """Two hourly series: a noisy daily sine (a linear map beats repeat-last) or random walks."""
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    if kind == "seasonal":
        cols = {f"s{k}": np.sin(2 * np.pi * t / 24 + k) + 0.1 * rng.normal(size=n) for k in range(2)}
    else:
        cols = {f"s{k}": np.cumsum(rng.normal(size=n)) for k in range(2)}
    return pd.DataFrame({"date": pd.date_range("2024-01-01", periods=n, freq="h").strftime("%Y-%m-%d %H:%M"),
                         **cols})


def corrupt_test_rows(df: pd.DataFrame, seed=1) -> pd.DataFrame:
    """Replace every row that only the test split reads (ratios 0.7/0.1/0.2) with large noise."""
    n = len(df)
    first_test_only = n - int(0.2 * n)
    out = df.copy()
    rng = np.random.default_rng(seed)
    for c in ("s0", "s1"):
        out.loc[first_test_only:, c] = 50 + 30 * rng.normal(size=n - first_test_only)
    return out


def test_closed_form_fit_is_the_revin_linear_forecaster():
    """The ridge weights, applied as RevIN + linear map (and as the frozen skip of a Mamba forecaster with a
    zero head), reproduce the validation MSE the selection scored."""
    table = table_from_frame(frame())
    prep = prepare(table, 48, 12)
    fit = min(autofit.ridge_path(prep), key=lambda f: f.val_mse)
    cfg = ForecasterConfig(n_series=2, lookback=48, horizon=12,
                           options=ForecasterOptions(token="patch", patch_len=8, patch_stride=8),
                           backbone=MambaConfig(d_model=8, n_layer=1, d_state=4, d_input=8))
    model = autofit.init_from_ridge(build_model(cfg), fit).eval()
    rlinear = build_model(ForecasterConfig(n_series=2, lookback=48, horizon=12,
                                                options=ForecasterOptions(kind="rlinear")))
    with torch.no_grad():
        rlinear.linear.weight.copy_(torch.as_tensor(fit.weight))
        rlinear.linear.bias.copy_(torch.as_tensor(fit.bias))
    for m in (model, rlinear):
        assert float(autofit.val_errors(m, prep).mean()) == pytest.approx(fit.val_mse, rel=1e-4)
    assert not model.skip.weight.requires_grad and model.head.weight.requires_grad


def test_strong_ridge_is_repeat_last_and_weak_ridge_fits_the_season():
    table = table_from_frame(frame())
    prep = prepare(table, 48, 12)
    fits = autofit.ridge_path(prep, alphas=(1e-4, 1e6))
    x, y = next(iter(torch.utils.data.DataLoader(prep.datasets["val"], batch_size=10_000)))
    naive = float(((repeat_last(x, 12) - y) ** 2).mean())
    assert fits[1].val_mse == pytest.approx(naive, rel=1e-3)      # shrunk all the way: repeat-last
    assert fits[1].dof < 0.01 < fits[0].dof
    assert fits[0].val_mse < 0.2 * naive                           # a sine is linear-predictable


@pytest.mark.parametrize("kind, strong", [("seasonal", False), ("random_walk", True)])
def test_ridge_strength_follows_the_data(kind, strong):
    table = table_from_frame(frame(n=1500, kind=kind))
    best, fits = autofit.select_linear(table, 24, [48, 96], {}, log=lambda *_: None)
    assert best.val_mse == min(f.val_mse for f in fits)
    assert (best.alpha >= 1.0) is strong, best


def test_candidate_lookbacks_grow_with_the_data():
    assert autofit.candidate_lookbacks(8640, 96) == [96, 192, 336, 720, 1440]
    assert autofit.candidate_lookbacks(1000, 96) == [96, 192]
    assert autofit.candidate_lookbacks(150, 24) == [48]            # the longest short one that fits
    assert autofit.candidate_lookbacks(20, 24) == []


def test_grid_keeps_fixed_choices():
    cfg = parse_config(FitConfig, ["--lookback", "48", "--model.d_model", "16", "--forecaster.loss", "mae"])
    grid = autofit.mamba_grid(cfg)
    assert all(d == 16 and loss == "mae" for d, _, loss, _ in grid)
    assert len(grid) == len(set(grid)) < len(autofit.MAMBA_GRID)
    assert autofit.lookback_candidates(table_from_frame(frame()), cfg) == [48]


def test_selection_reads_training_and_validation_rows_only():
    """Corrupting the rows only the test split reads changes the test error, never the chosen settings."""
    clean = table_from_frame(frame(n=1200))
    bad = table_from_frame(corrupt_test_rows(frame(n=1200)))
    b = split_borders(1200, 1, 1)
    assert np.array_equal(clean.values[:b["val"][1]], bad.values[:b["val"][1]])
    assert not np.allclose(clean.values[b["val"][1]:], bad.values[b["val"][1]:])
    runs = []
    for table in (clean, bad):
        best, fits = autofit.select_linear(table, 24, [48, 96, 192], {}, log=lambda *_: None)
        runs.append(([(f.lookback, f.alpha, f.val_mse) for f in fits], (best.lookback, best.alpha)))
    assert runs[0] == runs[1]


@pytest.fixture(scope="module")
def fits_clean_and_corrupted(tmp_path_factory):
    """The whole `fit` command (selection, one Mamba trial, baselines) on a CSV and on its corrupted twin."""
    d = tmp_path_factory.mktemp("autofit")
    out = {}
    for name, df in (("clean", frame(n=900)), ("corrupt", corrupt_test_rows(frame(n=900)))):
        csv = d / f"{name}.csv"
        df.to_csv(csv, index=False)
        assert run(fit_main, FitConfig, ["--csv", str(csv), "--horizon", "12", "--max-epochs", "1",
                                         "--search-budget", "0.001", "--output-dir", str(d / name),
                                         "--no-progress"]) == 0
        out[name] = json.loads((d / name / "metrics.json").read_text())
    return out


def test_fit_chooses_and_records_the_same_settings_without_test_rows(fits_clean_and_corrupted):
    clean, corrupt = fits_clean_and_corrupted["clean"], fits_clean_and_corrupted["corrupt"]
    sel = clean["selection"]
    assert sel["chosen"]["lookback"] in sel["lookback_candidates"] == [96, 192]
    # the linear map alone and one Mamba trial (the first always runs; a budget of 1 ms stops the second)
    assert len(sel["trials"]) == 2
    assert {"lookback", "ridge_alpha", "repeat_last", "cv_mse", "fold_mse", "best_by_lookback"} <= set(sel["linear"])
    for key in ("chosen", "linear", "lookback_candidates"):
        assert clean["selection"][key] == corrupt["selection"][key]
    assert [t["val_mse"] for t in clean["selection"]["trials"]] == [t["val_mse"] for t in sel["trials"]]
    for b in ("dlinear", "rlinear"):
        assert clean["baselines"][b]["lookback"] == corrupt["baselines"][b]["lookback"]
        assert clean["baselines"][b]["val_mse_by_lookback"] == corrupt["baselines"][b]["val_mse_by_lookback"]
    assert corrupt["test_mse"] > 10 * clean["test_mse"]          # the corruption did reach the test rows
    assert set(clean["baselines"]) == {"repeat_last", "seasonal_naive", "dlinear", "rlinear"}


def test_rolling_origin_folds_end_before_the_test_rows():
    table = table_from_frame(frame(n=2000))
    prep = prepare(table, 48, 24)
    t_end, v_end = prep.borders["train"][1], prep.borders["val"][1]          # 1400, 1600
    folds = autofit.fold_plan(prep, max_lookback=96)
    assert folds[0] == (t_end, len(prep.datasets["val"]))                     # fold 0: the validation split
    assert [o for o, _ in folds] == [1400, 1200, 1000, 800]
    for origin, n in folds:
        assert origin + n - 1 + 24 <= v_end                                   # last target row < v_end
    assert len(autofit.fold_plan(prep, max_lookback=96, n_folds=2)) == 2
    assert len(autofit.fold_plan(prep, max_lookback=400)) == 3                # 800 - 400 - 24 + 1 < 400


def test_each_fold_is_scored_without_rows_after_it():
    """Changing validation rows after fold 1's last target changes fold 0's errors only (the scaler reads the
    training rows, so the scaled earlier rows stay the same)."""
    df = frame(n=2000)
    prep = prepare(table_from_frame(df), 48, 24)
    later = df.copy()
    later.loc[1400 + 24:, "s0"] += 5.0
    fits = [autofit.ridge_path(prepare(table_from_frame(d), 48, 24), alphas=(1e-2,))[0] for d in (df, later)]
    assert len(fits[0].fold_errors) == len(autofit.fold_plan(prep, 48)) == 4
    assert not np.allclose(fits[0].fold_errors[0], fits[1].fold_errors[0])
    for a, b in zip(fits[0].fold_errors[1:], fits[1].fold_errors[1:]):
        np.testing.assert_array_equal(a, b)
    assert fits[0].val_mse == pytest.approx(fits[0].fold_mse[0])
    assert fits[0].cv_mse == pytest.approx(np.exp(np.mean(np.log(fits[0].fold_mse))))


def fitted_with_errors(errors, dof=1.0, alpha=1.0):
    errors = [np.asarray(e, dtype=np.float64) for e in errors]
    return autofit.RidgeFit(48, alpha, None, None, float(errors[0].mean()), dof,
                            [float(e.mean()) for e in errors], errors)


def test_a_fitted_map_must_beat_repeat_last_by_more_than_its_standard_error():
    rng = np.random.default_rng(0)
    naive = fitted_with_errors([1.0 + 0.5 * rng.random(200) for _ in range(2)], dof=0.0, alpha=float("inf"))
    noise = [n - n.mean() for n in (0.5 * rng.normal(size=200) for _ in range(2))]
    lucky = fitted_with_errors([e - 0.01 + n for e, n in zip(naive.fold_errors, noise)])    # lower by luck
    better = fitted_with_errors([e * 0.7 for e in naive.fold_errors])                        # clearly lower
    assert lucky.cv_mse < naive.cv_mse
    assert autofit.choose_linear([naive, lucky], horizon=10) is naive
    assert autofit.choose_linear([naive, lucky, better], horizon=10) is better
    assert autofit.choose_linear([lucky, better], horizon=10) is better       # no repeat-last: the lowest
    # One fold of one block of origins (a horizon longer than the fold): no evidence against the simpler one.
    naive1, better1 = (fitted_with_errors(f.fold_errors[:1], f.dof, f.alpha) for f in (naive, better))
    assert not autofit.clearly_better(better1.fold_errors, naive1.fold_errors, horizon=500)
    assert autofit.choose_linear([naive1, better1], horizon=500) is naive1
    assert autofit.choose_linear([naive1, better1], horizon=10) is better1


def test_a_mamba_correction_must_beat_the_linear_map_on_windows_it_was_not_stopped_on():
    rng = np.random.default_rng(1)
    base = 1.0 + rng.random(300)
    stop, check = autofit.stop_and_check_windows(300, horizon=12)
    assert sorted(stop + check) == list(range(300)) and stop[:12] == list(range(12)) and check[0] == 12

    def cand(errors, correction):
        return autofit.Fitted(None, None, None, float(np.mean(errors)), 0.0,
                              {"correction": correction, "val_errors": np.asarray(errors)})

    linear = cand(base, False)
    noise = 0.3 * rng.normal(size=300)
    lucky = cand(base - 0.005 + noise - noise.mean(), True)
    clear = cand(base * 0.8, True)
    overfit = base.copy()
    overfit[stop] *= 0.5          # far better where it was early-stopped, no better elsewhere
    assert autofit.choose_correction([linear, lucky], 12, stop, check) is linear
    assert autofit.choose_correction([linear, lucky, clear], 12, stop, check) is clear
    assert autofit.choose_correction([linear, cand(overfit, True)], 12, stop, check) is linear
    assert autofit.choose_correction([linear, clear], 12, *autofit.stop_and_check_windows(10, 12)) is linear


@pytest.mark.parametrize("kind", ["rlinear", "dlinear"])
def test_least_squares_baselines_are_the_optimum_of_their_training_loss(kind):
    """The closed-form baseline is its model class at the minimum of the training MSE: a gradient step from
    its weights does not lower the training loss, and its validation MSE is the one recorded."""
    table = table_from_frame(frame(n=1200))
    cfg = parse_config(FitConfig, ["--lookback", "48", "--horizon", "12"])
    b = autofit.least_squares_baseline(cfg, table, kind, log=lambda *_: None)
    assert b.record["lookback"] == 48 and b.record["val_mse_by_lookback"][48] == pytest.approx(b.val_mse, abs=1e-5)
    x, y = next(iter(torch.utils.data.DataLoader(b.prep.datasets["train"], batch_size=100_000)))
    model = b.model.train()
    loss = ((model(x) - y) ** 2).mean()
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params)
    with torch.no_grad():
        for p, g in zip(params, grads):
            p -= 1e-2 * g / max(float(g.norm()), 1e-12)
        assert float(((model(x) - y) ** 2).mean()) >= float(loss) - 1e-6
    assert max(float(g.abs().max()) for g in grads) < 1e-3


def test_zero_search_budget_is_the_closed_form_map_alone(tmp_path):
    cfg = parse_config(FitConfig, ["--horizon", "12", "--search-budget", "0"])
    fitted = autofit.fit_forecaster(cfg, table_from_frame(frame(n=1200)), tmp_path, log=lambda *_: None)
    assert [t["correction"] for t in fitted.record["trials"]] == [False]
    assert not fitted.record["chosen"]["correction"] and not (tmp_path / "search").exists()
    assert {f.alpha for f in fitted.linear_fits} == set(autofit.RIDGE_ALPHAS)


def test_a_fold_that_is_hard_for_every_candidate_does_not_decide_alone():
    """Fold scores combine as a geometric mean: twice as good on the quiet fold outweighs 20% worse on the
    fold where every candidate errs a lot (the arithmetic mean would pick the other)."""
    steady = fitted_with_errors([np.full(50, 0.10), np.full(50, 1.0)])
    sharp = fitted_with_errors([np.full(50, 0.05), np.full(50, 1.2)])
    assert np.mean(sharp.fold_mse) > np.mean(steady.fold_mse)
    assert autofit.choose_linear([steady, sharp], horizon=10) is sharp
