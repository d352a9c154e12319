"""benchmarks/forecast.py: dataset specs, the table's per-seed averages, missing cells, the PNG."""
import os

import pytest

from benchmarks.ett import append_row, load_results
from benchmarks.forecast import ForecastBenchConfig, parse_dataset, pending_cells, plot, report, run_cells
from ssm_core.cli import UserError

ROWS = ("model", "rlinear", "dlinear", "repeat_last", "seasonal_naive")


def cell(seed, h, base):
    return {"dataset": "d", "seed": seed, "horizon": h, "wall_seconds": 10.0, "fit_seconds": 5.0,
            "chosen": {"lookback": 96, "correction": seed == 0},
            **{r: {"test_mse": base + i + seed * 0.1, "test_mae": 1.0, **({"lookback": 192} if "linear" in r else {})}
               for i, r in enumerate(ROWS)}}


def test_parse_dataset():
    assert parse_dataset("a/b/ETTh2.csv:ett-hour") == ("ETTh2", "a/b/ETTh2.csv", "ett-hour")
    assert parse_dataset("x.csv") == ("x", "x.csv", "ratios")
    with pytest.raises(UserError, match="unknown protocol"):
        parse_dataset("x.csv:weekly")


def test_report_averages_per_seed_and_lists_missing_cells(tmp_path):
    cfg = ForecastBenchConfig(datasets=["d.csv"], horizons=[96, 192], seeds=[0, 1])
    results = [cell(0, 96, 1.0), cell(0, 192, 2.0), cell(1, 96, 1.0)]
    table = report(cfg, results)
    model_row = next(line for line in table.splitlines() if "default recipe" in line)
    # Only seed 0 has both horizons: its average (1.0 + 2.0) / 2, one seed counted.
    assert "| 1.500 |" in model_row and model_row.endswith("| 1 |")
    assert "1.050 ± 0.050" in model_row                      # H=96 over seeds 0 and 1
    assert "Missing cells (dataset, seed, horizon): ('d', 1, 192)" in table
    assert "correction kept in 1/2 seeds" in table
    plot(cfg, results, tmp_path / "t.png")
    assert (tmp_path / "t.png").stat().st_size > 1000


def fake_cell(cfg, spec, seed, horizon):
    """Stands in for a fit in the worker processes: a row named by its cell, and the worker's pid."""
    import os
    return {"dataset": parse_dataset(spec)[0], "seed": seed, "horizon": horizon, "pid": os.getpid()}


def test_pending_cells_skip_finished_ones_longest_first():
    cfg = ForecastBenchConfig(datasets=["a.csv", "b.csv:ett-hour"], horizons=[96, 720], seeds=[0, 1])
    todo = pending_cells(cfg, [{"dataset": "a", "seed": 0, "horizon": 720}])
    assert todo == [("b.csv:ett-hour", 0, 720), ("a.csv", 0, 96), ("b.csv:ett-hour", 0, 96),
                    ("a.csv", 1, 720), ("b.csv:ett-hour", 1, 720), ("a.csv", 1, 96), ("b.csv:ett-hour", 1, 96)]


@pytest.mark.parametrize("workers", [1, 2])
def test_cells_run_in_parallel_and_resume(tmp_path, workers):
    """Every pending cell runs once (in worker processes with --workers 2), the parent appends each row, and
    a rerun finds nothing left to do."""
    cfg = ForecastBenchConfig(datasets=["a.csv", "b.csv"], horizons=[96, 192], seeds=[0], workers=workers)
    results = tmp_path / "results.jsonl"
    append_row(results, {"dataset": "a", "seed": 0, "horizon": 96}, "test")
    run_cells(cfg, results, run=fake_cell)
    rows = load_results(results)
    assert sorted((r["dataset"], r["horizon"]) for r in rows) == [("a", 96), ("a", 192), ("b", 96), ("b", 192)]
    pids = {r["pid"] for r in rows if "pid" in r}
    assert (os.getpid() in pids) is (workers == 1) and len(rows) == 4
    run_cells(cfg, results, run=fake_cell)
    assert len(load_results(results)) == 4


def test_bad_workers_flag():
    with pytest.raises(ValueError, match="--workers"):
        ForecastBenchConfig(workers=0)


def test_time_limit_stops_starting_cells(tmp_path, capsys):
    cfg = ForecastBenchConfig(datasets=["a.csv"], horizons=[96, 192], seeds=[0], time_limit=1e-9)
    results = tmp_path / "results.jsonl"
    run_cells(cfg, results, run=fake_cell)
    assert load_results(results) == [] and "2 cell(s) not started" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--time-limit"):
        ForecastBenchConfig(time_limit=0)


def test_lookback_ensemble_diagnostic_refits_the_folds_as_the_recipe_does(tmp_path):
    """benchmarks/forecast_lookback_ensemble.py: each member's refitted fold forecasts reproduce the fold
    errors `autofit.ridge_path` scored it by, and the report says what the recipe's rules would do."""
    import numpy as np
    import pandas as pd

    from benchmarks.forecast_lookback_ensemble import EnsembleConfig, main, member_forecasts, targets
    from timeseries import autofit
    from timeseries.data import prepare, read_table
    rng = np.random.default_rng(0)
    t = np.arange(3000)
    df = pd.DataFrame({"date": pd.date_range("2024-01-01", periods=len(t), freq="h").strftime("%Y-%m-%d %H:%M"),
                       **{f"s{k}": np.sin(2 * np.pi * t / 24 + k) + 0.3 * rng.normal(size=len(t)) for k in range(2)}})
    csv = tmp_path / "d.csv"
    df.to_csv(csv, index=False)
    table = read_table(csv)
    prep = prepare(table, 96, 24)
    folds = autofit.fold_plan(prep, 192)
    fits = autofit.ridge_path(prep, autofit.RIDGE_ALPHAS, folds)
    best = min(fits, key=lambda f: f.cv_mse)
    preds, truth = member_forecasts(prep, best.alpha, folds), targets(prep, folds)
    assert len(folds) >= 2
    for k in range(len(folds)):
        assert np.isclose(((preds[k] - truth[k]) ** 2).mean(), best.fold_mse[k], rtol=1e-4)
    row = main(EnsembleConfig(csv=str(csv), horizons=[24], out=str(tmp_path / "e.jsonl")))[0]
    assert row["chosen"]["lookback"] in [m["lookback"] for m in row["members"]]
    assert {"folds_prefer_it", "clearly_better_than_repeat_last", "test_mse"} <= set(row["ensemble all"])
    assert (tmp_path / "e.jsonl").read_text().count("\n") == 1


def test_fit_summary_names_what_the_chosen_model_computes():
    """A Mamba forecaster whose correction was not kept is its linear map (or repeat-last): the table says so."""
    from timeseries.fit import summary_table
    row = {"test_mse": 0.1, "test_mae": 0.2, "test_mse_original": 1.0, "test_mae_original": 2.0}
    metrics = {**row, "model": {"options": {"kind": "mamba"}}, "baselines": {"dlinear": row},
               "selection": {"chosen": {"correction": False}, "linear": {"repeat_last": True}}}
    assert summary_table(metrics).splitlines()[1].startswith("ours: repeat-last")
    metrics["selection"]["linear"]["repeat_last"] = False
    assert summary_table(metrics).splitlines()[1].startswith("ours: linear map")
    metrics["selection"]["chosen"]["correction"] = True
    assert summary_table(metrics).splitlines()[1].startswith("ours: mamba")
    del metrics["selection"]
    assert summary_table(metrics).splitlines()[1].startswith("ours: mamba")     # flags fixed every setting
