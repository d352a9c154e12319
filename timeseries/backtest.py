"""Rolling-origin evaluation of a fitted model: forecast from several origins, score each against what
happened, next to the naive baselines.

    python -m timeseries.backtest --model runs/mine --csv data.csv --folds 8 [--step 24]

The last fold's horizon ends at the last row of the CSV; earlier origins step back by --step rows (default:
the horizon, so folds do not overlap). Use data the model was not trained on: a fold whose origin lies in
the fit's training period is flagged. Writes <output-dir>/backtest.csv, backtest.json and backtest.png.
"""
from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ssm_core.cli import UserError, main_entry, plain_warnings
from ssm_core.io import atomic_path, save_figure_atomic, write_json_atomic
from ssm_core.training import prepare_output_dir

from .data import season_length
from .models import repeat_last, seasonal_naive
from .persistence import load_forecaster
from .predict import forecast_from, load_scaled


@dataclass
class BacktestConfig:
    model: str | None = field(default=None, metadata={"help": "output folder of timeseries.fit"})
    csv: str | None = field(default=None, metadata={"help": "data to backtest on"})
    folds: int = 8
    step: int | None = field(default=None, metadata={"help": "rows between origins (default: the horizon)"})
    season: int | None = field(default=None, metadata={"help": "seasonal-naive period (default: from dates)"})
    output_dir: str | None = field(default=None, metadata={"help": "default: <model>/backtest"})
    threads: int = field(default=1, metadata={"help": "CPU threads for torch ops (0: torch's default)"})

    def __post_init__(self):
        for name in ("model", "csv"):
            if not getattr(self, name):
                raise ValueError(f"--{name}: required")
        if self.folds < 1 or (self.step is not None and self.step < 1):
            raise ValueError("--folds and --step: must be >= 1")


def backtest(cfg: BacktestConfig) -> pd.DataFrame:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    saved = load_forecaster(cfg.model)
    meta = saved.meta
    L, H = meta["lookback"], meta["horizon"]
    table, scaled = load_scaled(saved, cfg.csv)
    n, step = len(scaled), cfg.step or H
    origins = [n - H - k * step for k in reversed(range(cfg.folds))]
    origins = [o for o in origins if o >= L]
    if not origins:
        raise UserError(f"--csv {cfg.csv}: {n} rows, too few for one fold (needs lookback {L} + horizon {H})")
    out = prepare_output_dir(cfg.output_dir or Path(cfg.model) / "backtest")
    season = cfg.season or season_length(table.freq or meta["freq"])
    out_cols = saved.index(meta["outputs"])
    mean, scale = saved.mean[out_cols], saved.scale[out_cols]
    quantiles = meta["model"]["options"]["quantiles"]
    train_end = pd.Timestamp(meta["train_end"]) if meta.get("train_end") and table.dates is not None else None

    rows = []
    for fold, o in enumerate(origins):
        actual = scaled[o:o + H][:, out_cols]
        history = torch.as_tensor(scaled[o - L:o][:, out_cols])[None]
        fc = forecast_from(saved, scaled, o)
        point = fc[..., quantiles.index(0.5)] if quantiles else fc
        preds = {"model": (point - mean) / scale,
                 "repeat_last": repeat_last(history, H)[0].numpy(),
                 "seasonal_naive": seasonal_naive(history, H, season)[0].numpy()}
        origin = table.dates[o] if table.dates is not None else o
        row = {"fold": fold, "origin": origin,
               "in_training_period": bool(train_end is not None and origin <= train_end)}
        for name, p in preds.items():
            err = p - actual
            row[f"{name}_mse"] = float(np.mean(err ** 2))
            row[f"{name}_mae"] = float(np.mean(np.abs(err)))
            row[f"{name}_mae_original"] = float(np.mean(np.abs(err * scale)))
        rows.append(row)
    frame = pd.DataFrame(rows)
    if frame["in_training_period"].any():
        warnings.warn(f"{int(frame['in_training_period'].sum())} of {len(frame)} folds start inside the "
                      f"model's training period (up to {train_end}); their errors are optimistic", stacklevel=2)
    with atomic_path(out / "backtest.csv") as tmp:
        frame.to_csv(tmp, index=False)
    summary = {name: {m: float(frame[f"{name}_{m}"].mean()) for m in ("mse", "mae", "mae_original")}
               for name in ("model", "repeat_last", "seasonal_naive")}
    write_json_atomic(out / "backtest.json", {"folds": len(frame), "step": step, "horizon": H, "season": season,
                                              "mean": summary,
                                              "per_fold": frame.assign(origin=frame["origin"].astype(str))
                                                               .to_dict("records")})
    plot_folds(frame, out / "backtest.png")
    print(frame.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print("mean: " + ", ".join(f"{k} mse {v['mse']:.4f} mae {v['mae']:.4f}" for k, v in summary.items()),
          file=sys.stderr)
    return frame


def plot_folds(frame: pd.DataFrame, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 3.5))
    for name in ("model", "repeat_last", "seasonal_naive"):
        ax.plot(frame["fold"], frame[f"{name}_mse"], marker="o", label=name)
    ax.set_xlabel("fold (origin, oldest to newest)")
    ax.set_ylabel("MSE (normalised)")
    ax.set_title("rolling-origin backtest")
    ax.legend()
    save_figure_atomic(fig, path)


def main(cfg: BacktestConfig) -> None:
    plain_warnings()
    backtest(cfg)


if __name__ == "__main__":
    main_entry(main, BacktestConfig, prog="python -m timeseries.backtest", description=__doc__.split("\n")[0])
