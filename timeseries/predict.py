"""Forecast the next horizon after the end of a CSV with a model saved by `timeseries.fit`.

    python -m timeseries.predict --model runs/mine --csv new.csv [--output forecast.csv]

The CSV needs the columns the model was fitted on (any others are ignored) and at least `lookback` rows;
it is scaled with the scaler saved at fit time. The forecast (in the data's own units, one row per future
step, dated when the CSV has dates) is written to --output and printed.

--output never replaces the input CSV, and replaces an existing file only when it is an earlier forecast
of the same shape (the same header and one row per horizon step): anything else is the user's, and is
refused.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ssm_core.cli import UserError, main_entry, plain_warnings
from ssm_core.io import write_text_atomic
from ssm_core.validation import distinct_paths, output_file

from .data import Table, read_table
from .persistence import SavedForecaster, future_dates, load_forecaster


@dataclass
class PredictConfig:
    model: str | None = field(default=None, metadata={"help": "output folder of timeseries.fit (or its model/)"})
    csv: str | None = field(default=None, metadata={"help": "history to forecast from (latest rows are used)"})
    output: str | None = field(default=None, metadata={"help": "where to write the forecast CSV (default: "
                                                                "<model>/prediction.csv)"})
    threads: int = field(default=1, metadata={"help": "CPU threads for torch ops (0: torch's default)"})

    def __post_init__(self):
        for name in ("model", "csv"):
            if not getattr(self, name):
                raise ValueError(f"--{name}: required")


def load_scaled(saved: SavedForecaster, csv: str) -> tuple[Table, np.ndarray]:
    """The CSV's columns the model knows, scaled with the fit-time scaler: (table, scaled (rows, used))."""
    table = read_table(csv, columns=saved.meta["used"])
    lookback = saved.meta["lookback"]
    if len(table.values) < lookback:
        raise UserError(f"--csv {csv}: {len(table.values)} rows, the model needs at least --lookback "
                        f"{lookback}")
    return table, (table.values - saved.mean) / saved.scale


@torch.no_grad()
def forecast_from(saved: SavedForecaster, scaled: np.ndarray, end: int) -> np.ndarray:
    """Forecast the horizon after row `end` (exclusive) in original units: (H, outputs[, quantiles])."""
    meta = saved.meta
    x = torch.as_tensor(scaled[end - meta["lookback"]:end, saved.index(meta["inputs"])], dtype=torch.float32)
    out_in_inputs = [meta["inputs"].index(c) for c in meta["outputs"]]
    pred = saved.model(x[None])[0][:, out_in_inputs].double().numpy()
    out = saved.index(meta["outputs"])
    mean, scale = saved.mean[out], saved.scale[out]
    return pred * scale[:, None] + mean[:, None] if pred.ndim == 3 else pred * scale + mean


def output_path(cfg: PredictConfig) -> Path:
    """Where the forecast goes, refused before any work when it would overwrite the input or a folder."""
    out = Path(cfg.output) if cfg.output else Path(cfg.model) / "prediction.csv"
    distinct_paths(cfg.csv, out, ("--csv", "--output"))
    return output_file(out, "--output")


def check_replaceable(out: Path, text: str) -> None:
    """Refuse to replace an existing file unless it is an earlier forecast shaped like `text`."""
    if not out.exists():
        return
    header, rows = text.split("\n", 1)[0], text.count("\n") - 1
    try:
        with open(out, encoding="utf-8", errors="replace") as f:
            lines = [line.rstrip("\r\n") for _, line in zip(range(rows + 2), f)]
    except OSError as e:
        raise UserError(f"--output {out}: cannot read the existing file ({e.strerror or e})") from None
    if not lines or lines[0] != header or len(lines) != rows + 1:
        raise UserError(f"--output {out}: exists and is not an earlier forecast of this model (header "
                        f"{header!r}, {rows} rows); choose another file or remove it")


def predict(cfg: PredictConfig) -> pd.DataFrame:
    out = output_path(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    saved = load_forecaster(cfg.model)
    meta = saved.meta
    table, scaled = load_scaled(saved, cfg.csv)
    fc = forecast_from(saved, scaled, len(scaled))
    H, quantiles = meta["horizon"], meta["model"]["options"]["quantiles"]
    dates = future_dates(table.dates[-1] if table.dates is not None else None, table.freq or meta["freq"], H)
    index = pd.Index(dates if dates is not None else np.arange(len(scaled), len(scaled) + H),
                     name=table.date_col or "row")
    cols = {}
    for j, c in enumerate(meta["outputs"]):
        if quantiles:
            cols[c] = fc[:, j, quantiles.index(0.5)]
            for k, q in enumerate(quantiles):
                cols[f"{c}_q{q:g}"] = fc[:, j, k]
        else:
            cols[c] = fc[:, j]
    frame = pd.DataFrame(cols, index=index)
    text = frame.to_csv(lineterminator="\n")
    check_replaceable(out, text)
    try:
        write_text_atomic(out, text)
    except OSError as e:
        raise UserError(f"--output {out}: cannot write ({e.strerror or e})") from None
    print(frame.to_string(max_rows=20))
    print(f"timeseries.predict: {H} steps after {index.name} {table.dates[-1] if table.dates is not None else len(scaled) - 1}"
          f" -> {out}", file=sys.stderr)
    return frame


def main(cfg: PredictConfig) -> None:
    plain_warnings()
    predict(cfg)


if __name__ == "__main__":
    main_entry(main, PredictConfig, prog="python -m timeseries.predict", description=__doc__.split("\n")[0])
