"""Fit a forecaster on a CSV and evaluate it honestly against baselines.

    python -m timeseries.fit --csv data.csv --horizon 96                 # the default recipe: settings
    python -m timeseries.fit                                             # chosen on validation (autofit.py)
    python -m timeseries.fit --csv data.csv --horizon 96 --lookback 336  # any flag fixes that choice
    python -m timeseries.fit --csv ETTh2.csv --config configs/timeseries/etth2.yaml
    python -m timeseries.fit --forecaster.token variate --model.d_model 128 --optim.lr 5e-4 --forecaster.loss mae

The settings left unset are chosen on the validation split: --lookback, --model.d_model, --model.n_layer,
--optim.lr, --forecaster.loss (and --forecaster.patch_len from the lookback).

Writes into --output-dir: metrics.json (test MSE/MAE of the model and of each baseline, normalised and in
original units, and what was chosen on validation), forecast.csv and forecast.png (the latest test window,
forecast vs actual), model/ (for `python -m timeseries.predict`), config.yaml (the resolved configuration:
`--config` of it repeats the run, search included), search/ and baselines/ (checkpoints, logs).
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ssm_core.cli import main_entry, plain_warnings
from ssm_core.io import atomic_path, save_figure_atomic, write_json_atomic
from ssm_core.training import prepare_run, save_run_config

from . import autofit
from .data import (
    Prepared,
    Table,
    prepare,
    read_table,
    resolve_protocol,
    season_length,
    synthetic_frame,
    table_from_frame,
)
from .evaluation import baseline_predictors, error_metrics, forecast_windows, model_predictor
from .persistence import save_forecaster
from .train import FitConfig


def load_table(cfg: FitConfig, out: Path) -> Table:
    if cfg.csv is None:
        # The embedded default: written next to the results so `predict --csv` can be tried on it.
        frame = synthetic_frame(seed=cfg.seed)
        with atomic_path(out / "data.csv") as tmp:
            frame.to_csv(tmp, index=False)
        table = table_from_frame(frame, date_col=cfg.date_col, where="embedded data")
    else:
        table = read_table(cfg.csv, date_col=cfg.date_col)
    return table


def describe(prep: Prepared) -> str:
    t = prep.table
    sizes = ", ".join(f"{k} {len(ds)}" for k, ds in prep.datasets.items())
    return (f"{len(t.values)} rows, freq {t.freq or 'unknown'}, inputs {len(prep.inputs)} -> outputs "
            f"{', '.join(prep.outputs[:8])}{' ...' if len(prep.outputs) > 8 else ''}; windows: {sizes}")


# What a run writes into --output-dir (and what --overwrite may remove there); data.csv: the embedded data.
OUTPUTS = ("checkpoints", "logs", "model/forecaster.json", "model/model.safetensors", "search", "baselines",
           "config.yaml", "data.csv", "metrics.json", "forecast.csv", "forecast.png")
# Where the trainings of the default recipe keep their checkpoints: the search's trials, the baselines.
CHECKPOINTS = ("search/*/checkpoints", "search/*/*/checkpoints", "baselines/*/*/checkpoints")


def fit(cfg: FitConfig) -> dict:
    """The whole `fit` command; returns the metrics it writes."""
    out = prepare_run(cfg, "timeseries.fit", OUTPUTS, checkpoints=CHECKPOINTS)
    save_run_config(cfg, out)
    lookback_flag = cfg.lookback
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    table = load_table(cfg, out)
    cfg = dataclasses.replace(cfg, protocol=resolve_protocol(cfg.protocol, cfg.csv))
    # Bad columns or data too short for any window fail here, in one line, before any announcement.
    lookbacks = autofit.lookback_candidates(table, cfg)
    prepare(table, min(lookbacks), cfg.horizon, **autofit.prep_kwargs(cfg))
    unset = [flag for flag, value in (("--lookback", cfg.lookback), ("--model.d_model", cfg.model.d_model),
                                      ("--model.n_layer", cfg.model.n_layer), ("--forecaster.loss", cfg.forecaster.loss),
                                      ("--optim.lr", cfg.optim.lr)) if value is None]
    if unset or cfg.baselines:
        # The first line says how long this may take: the search trains several models, so the whole
        # command can take longer than the chosen model's own fit.
        print("timeseries.fit: may take several minutes: "
              + (f"choosing {', '.join(unset)} on rolling-origin folds of the training and validation rows "
                 f"(closed-form linear maps at lookbacks {lookbacks}, then Mamba trials for up to "
                 f"--search-budget {cfg.search_budget:g} s)" if unset else "settings fixed by flags")
              + (f"; DLinear and RLinear baselines fitted at each of {len(lookbacks)} lookback(s) "
                 "(--no-baselines skips them)" if cfg.baselines else ""), file=sys.stderr)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    chosen = autofit.fit_forecaster(cfg, table, out, log)
    model, prep, cfg = chosen.model, chosen.prep, chosen.cfg
    print(f"timeseries.fit: {describe(prep)}", file=sys.stderr)
    print(f"timeseries.fit: chosen {settings_line(chosen)}", file=sys.stderr)
    season = cfg.season or season_length(prep.table.freq)
    mean, scale = prep.output_mean, prep.output_scale
    pred, actual = forecast_windows(model_predictor(model, prep), prep.datasets["test"])
    metrics = {**error_metrics(pred, actual, mean, scale), "fit_seconds": round(chosen.fit_seconds, 1),
               "val_mse": chosen.val_mse, "selection": chosen.record}

    baselines = {}
    if cfg.baselines:
        for name, predict in baseline_predictors(prep, season).items():
            baselines[name] = error_metrics(*forecast_windows(predict, prep.datasets["test"]), mean, scale)
        base_cfg = dataclasses.replace(cfg, lookback=lookback_flag)
        for kind in ("dlinear", "rlinear"):
            # Each at its own lookback, chosen by the recipe's rule (fixed if --lookback is given); at its
            # exact least-squares optimum, except for quantile forecasts (pinball loss: trained with Lightning).
            b = (autofit.fit_linear_baseline(base_cfg, table, kind, out / "baselines" / kind, log)
                 if cfg.forecaster.quantiles else
                 autofit.least_squares_baseline(base_cfg, table, kind, chosen.linear_fits, log))
            baselines[kind] = {**error_metrics(*forecast_windows(model_predictor(b.model, b.prep),
                                                                 b.prep.datasets["test"]), mean, scale),
                               "fit_seconds": round(b.fit_seconds, 1), "val_mse": b.val_mse, **b.record}
    metrics.update(baselines=baselines, model=model.cfg.to_dict(), season=season,
                   data={"csv": cfg.csv or "embedded", "rows": len(prep.table.values), "freq": prep.table.freq,
                         "inputs": prep.inputs, "outputs": prep.outputs, "mode": cfg.mode,
                         "protocol": cfg.protocol, "borders": prep.borders,
                         "windows": {k: len(ds) for k, ds in prep.datasets.items()}})

    dates, train_rows = prep.table.dates, prep.borders["train"][1]
    save_forecaster(out / "model", model, prep, extra={
        "mode": cfg.mode, "train_end": str(dates[train_rows - 1]) if dates is not None else None})
    write_forecast(out, model, prep)
    write_json_atomic(out / "metrics.json", metrics)
    print(summary_table(metrics), file=sys.stderr)
    print(f"timeseries.fit: wrote {out}/metrics.json, forecast.csv, forecast.png, model/", file=sys.stderr)
    return metrics


@torch.no_grad()
def write_forecast(out: Path, model, prep: Prepared, max_series: int = 4) -> None:
    """forecast.csv + forecast.png for the latest test window, in the data's own units."""
    ds = prep.datasets["test"]
    x, y = ds[len(ds) - 1]
    raw = model(x[None])[0].index_select(1, torch.tensor(prep.output_idx_in_inputs)).numpy()  # (H, C[, Q])
    quantiles = model.cfg.quantiles
    mean, scale = prep.output_mean, prep.output_scale
    unscale = (lambda a: a * scale[:, None] + mean[:, None]) if quantiles else (lambda a: a * scale + mean)
    fc = unscale(raw)
    actual = y.numpy() * scale + mean
    history = x.numpy()[:, prep.output_idx_in_inputs] * scale + mean
    start = prep.borders["test"][1] - prep.horizon
    dates = prep.table.dates
    index = dates[start:start + prep.horizon] if dates is not None else np.arange(start, start + prep.horizon)
    cols = {}
    for j, c in enumerate(prep.outputs):
        cols[f"{c}_actual"] = actual[:, j]
        if quantiles:
            for k, q in enumerate(quantiles):
                cols[f"{c}_q{q:g}"] = fc[:, j, k]
            cols[f"{c}_forecast"] = fc[:, j, quantiles.index(0.5)]
        else:
            cols[f"{c}_forecast"] = fc[:, j]
    frame = pd.DataFrame(cols, index=pd.Index(index, name=prep.table.date_col or "row"))
    with atomic_path(out / "forecast.csv") as tmp:
        frame.to_csv(tmp)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n = min(max_series, len(prep.outputs))
    # The first series and the last one (TSLib's target convention, e.g. ETT's OT) when not all fit.
    shown = list(range(n - 1)) + [len(prep.outputs) - 1]
    fig, axes = plt.subplots(n, 1, figsize=(10, 2.4 * n), squeeze=False, sharex=True)
    L, H = prep.lookback, prep.horizon
    for j, ax in zip(shown, axes[:, 0]):
        ax.plot(range(-L, 0), history[:, j], color="0.5", lw=1, label="history")
        ax.plot(range(H), actual[:, j], color="k", lw=1.2, label="actual")
        if quantiles:
            ax.fill_between(range(H), fc[:, j, 0], fc[:, j, -1], color="C0", alpha=0.25,
                            label=f"q{quantiles[0]:g}-q{quantiles[-1]:g}")
            ax.plot(range(H), fc[:, j, quantiles.index(0.5)], color="C0", lw=1.2, label="forecast (median)")
        else:
            ax.plot(range(H), fc[:, j], color="C0", lw=1.2, label="forecast")
        ax.axvline(0, color="0.8", lw=0.8)
        ax.set_ylabel(prep.outputs[j])
    axes[0, 0].legend(loc="upper left", fontsize=8, ncol=4)
    axes[-1, 0].set_xlabel("steps from the forecast origin (latest test window)")
    fig.suptitle(f"{prep.outputs[0] if n == 1 else f'{n} of {len(prep.outputs)} series'}: "
                 f"horizon {H} from lookback {L}")
    save_figure_atomic(fig, out / "forecast.png")


def settings_line(chosen: autofit.Fitted) -> str:
    c = chosen.cfg
    o, lr = c.forecaster, c.optim.lr
    if o.kind != "mamba":
        return f"{o.kind}, lookback {c.lookback}, loss {o.loss}, lr {lr:g} (validation MSE {chosen.val_mse:.4f})"
    linear = chosen.record.get("linear")
    head = f"lookback {c.lookback}"
    if linear:
        head += (", repeat-last (no fitted map beat it on the rolling-origin folds)" if linear["repeat_last"]
                 else f", linear map ridge alpha {linear['ridge_alpha']:g}")
    if not chosen.record.get("chosen", {}).get("correction", True):
        return (f"{head}, no Mamba correction (none was clearly better on the validation windows it was not "
                f"early-stopped on; validation MSE {chosen.val_mse:.4f})")
    return (f"{head}, Mamba correction over {o.token} tokens: d_model {c.model.d_model}, n_layer "
            f"{c.model.n_layer}, patch {o.patch_len}, loss {o.loss}, lr {lr:g} (validation MSE {chosen.val_mse:.4f})")


def chosen_label(metrics: dict) -> str:
    """The chosen model's row name: what it computes, not only its class (the default recipe's Mamba
    forecaster without a correction is its closed-form linear map, or repeat-last)."""
    kind = metrics["model"]["options"]["kind"]
    sel = metrics.get("selection", {})
    if kind == "mamba" and sel.get("chosen", {}).get("correction") is False and "linear" in sel:
        return "ours: repeat-last" if sel["linear"].get("repeat_last") else "ours: linear map"
    return f"ours: {kind}"


def summary_table(metrics: dict) -> str:
    rows = [(chosen_label(metrics), metrics)] + list(metrics.get("baselines", {}).items())
    lines = [f"{'model':<18}{'test_mse':>10}{'test_mae':>10}{'mse (orig)':>14}{'mae (orig)':>12}"]
    for name, m in rows:
        lines.append(f"{name:<18}{m['test_mse']:>10.4f}{m['test_mae']:>10.4f}{m['test_mse_original']:>14.4g}"
                     f"{m['test_mae_original']:>12.4g}")
    return "\n".join(lines)


def main(cfg: FitConfig) -> None:
    plain_warnings()
    fit(cfg)


if __name__ == "__main__":
    main_entry(main, FitConfig, prog="python -m timeseries.fit", description=__doc__.split("\n")[0])
