"""CSV in, windows out: loading, column checks, the TSLib split borders, the train-only scaler.

The protocol follows Time-Series-Library (`Dataset_ETT_hour`, `Dataset_ETT_minute`, `Dataset_Custom`):

* `ett-hour`:   train rows [0, 8640), validation [8640 - L, 11520), test [11520 - L, 14400)   (L = lookback)
* `ett-minute`: the same borders times 4 (15-minute data)
* ratios (default 0.7/0.1/0.2): n_train = int(0.7 n), n_test = int(0.2 n), n_val = the rest; validation and
  test start L rows early so their first window has a full lookback.

Each split yields every window of stride 1 (`n_rows - L - H + 1` of them; no drop_last), and the
StandardScaler is fit on the training rows only.

Missing values (empty cells, NaN) are filled forward, then backward, with a warning naming the columns;
an infinite value is refused with its column and row, since no fill rule makes it a measurement.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
from sklearn.preprocessing import StandardScaler
from torch.utils.data import Dataset

from ssm_core.cli import UserError

Mode = Literal["M", "S", "MS"]
Protocol = Literal["auto", "ratios", "ett-hour", "ett-minute"]

DATE_NAMES = ("date", "datetime", "timestamp", "time", "ds")
# TSLib's ETT borders in hours: 12 months train, 4 validation, 4 test (30-day months).
ETT_HOUR_BORDERS = (12 * 30 * 24, 16 * 30 * 24, 20 * 30 * 24)


@dataclass
class Table:
    """A CSV as the models see it: numeric values (rows, columns) and the optional timestamps."""
    values: np.ndarray                  # float64 (rows, len(columns)), missing values already filled
    columns: list[str]
    dates: pd.DatetimeIndex | None
    date_col: str | None
    freq: str | None                    # pandas offset alias ('h', '15min', 'D', ...) when inferable


def read_table(path: str | Path, date_col: str | None = None, columns: list[str] | None = None,
               flag: str = "--csv") -> Table:
    """Read a CSV, find its date column, keep its numeric columns (or `columns`), fill gaps with a warning."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{flag} {path}: no such file")
    try:
        df = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise UserError(f"{flag} {path}: not a readable CSV ({str(e).splitlines()[0]})") from None
    if df.empty:
        raise UserError(f"{flag} {path}: no data rows")
    return table_from_frame(df, date_col=date_col, columns=columns, where=f"{flag} {path}")


def table_from_frame(df: pd.DataFrame, date_col: str | None = None, columns: list[str] | None = None,
                     where: str = "data") -> Table:
    df = df.copy()
    df.columns = [str(c).strip() for c in df.columns]
    date_col = _find_date_column(df, date_col, where)
    dates = None
    if date_col is not None:
        dates = _parse_dates(df[date_col], date_col, where)
    candidates = [c for c in df.columns if c != date_col]
    if columns is None:
        numeric = [c for c in candidates if _as_numeric(df[c]) is not None]
        if not numeric:
            raise UserError(f"{where}: no numeric columns (columns: {', '.join(df.columns)})")
        columns = numeric
    else:
        for c in columns:
            if c not in candidates:
                raise UserError(f"{where}: no column {c!r} (columns: {', '.join(candidates)})")
    data = {}
    for c in columns:
        col = _as_numeric(df[c])
        if col is None:
            raise UserError(f"{where}: column {c!r} is not numeric")
        if col.isna().all():
            raise UserError(f"{where}: column {c!r} is entirely missing")
        data[c] = col
    frame = pd.DataFrame(data)
    # Infinity is not a gap to fill: it is a value no scaler or model can use, so the row is named instead.
    infinite = np.isinf(frame.to_numpy(np.float64))
    if infinite.any():
        row, col = (int(i[0]) for i in np.nonzero(infinite))
        raise UserError(f"{where}: column {frame.columns[col]!r}, row {row + 2} is {frame.iat[row, col]}; "
                        "replace it with a number, or leave it empty to have it filled "
                        f"({int(infinite.sum())} infinite value{'s' if infinite.sum() > 1 else ''} in all)")
    n_missing = int(frame.isna().sum().sum())
    if n_missing:
        gaps = ", ".join(f"{c} ({n})" for c, n in frame.isna().sum().items() if n)
        warnings.warn(f"{where}: filled {n_missing} missing values (forward, then backward fill): {gaps}",
                      stacklevel=2)
        frame = frame.ffill().bfill()
    freq = infer_freq(dates) if dates is not None else None
    return Table(values=frame.to_numpy(np.float64), columns=list(columns), dates=dates, date_col=date_col,
                 freq=freq)


def _as_numeric(s: pd.Series) -> pd.Series | None:
    """The column as floats, or None when it holds text that is not a number (a label, a name)."""
    if pd.api.types.is_bool_dtype(s):
        return None
    if pd.api.types.is_numeric_dtype(s):
        return s.astype(np.float64)
    conv = pd.to_numeric(s, errors="coerce")
    if (conv.isna() & s.notna() & (s.astype(str).str.strip() != "")).any():
        return None
    return conv.astype(np.float64)


def _find_date_column(df: pd.DataFrame, date_col: str | None, where: str) -> str | None:
    if date_col is not None:
        if date_col not in df.columns:
            raise UserError(f"--date-col {date_col!r}: no such column in {where} (columns: {', '.join(df.columns)})")
        return date_col
    for c in df.columns:
        if c.lower() in DATE_NAMES:
            return c
    # Otherwise the first text column whose values all parse as dates.
    for c in df.columns:
        if not pd.api.types.is_numeric_dtype(df[c]) and _as_numeric(df[c]) is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                parsed = pd.to_datetime(df[c], errors="coerce", format="mixed")
            if parsed.notna().all():
                return c
    return None


def _parse_dates(s: pd.Series, name: str, where: str) -> pd.DatetimeIndex:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        parsed = pd.to_datetime(s, errors="coerce", format="mixed")
    bad = parsed.isna()
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise UserError(f"{where}: date column {name!r}: row {row + 2} ({s.iloc[row]!r}) is not a date")
    idx = pd.DatetimeIndex(parsed)
    steps = np.diff(idx.asi8)
    if (steps <= 0).any():
        row = int(np.flatnonzero(steps <= 0)[0]) + 1
        raise UserError(f"{where}: date column {name!r} is not strictly increasing: row {row + 2} "
                        f"({idx[row]}) follows {idx[row - 1]}")
    return idx


def infer_freq(dates: pd.DatetimeIndex) -> str | None:
    """Pandas' inferred frequency, else the most common step (data with a few gaps still has one)."""
    if len(dates) < 3:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pandas is changing infer_freq's return type; we take the alias
        freq = pd.infer_freq(dates[: min(len(dates), 1000)])
    if freq is None:
        freq = pd.Series(dates[1:] - dates[:-1]).mode().iloc[0]
    return pd.tseries.frequencies.to_offset(freq).freqstr


def season_length(freq: str | None, default: int = 24) -> int:
    """Samples per natural cycle: a day for sub-daily data, a week for daily data, a year for monthly."""
    if freq is None:
        return default
    step = pd.tseries.frequencies.to_offset(freq)
    try:
        seconds = pd.Timedelta(step).total_seconds()
    except ValueError:  # calendar offsets (months, quarters, years) have no fixed length
        return {"M": 12, "Q": 4}.get(step.name[:1], default) if step.name else default
    if seconds <= 0:
        return default
    if seconds < 86400:
        return max(1, round(86400 / seconds))
    if seconds < 7 * 86400:
        return max(1, round(7 * 86400 / seconds))
    return 52 if seconds == 7 * 86400 else default


# --- columns and modes --------------------------------------------------------------------------------
def select_columns(table_columns: list[str], mode: Mode, target: list[str] | None) -> tuple[list[str], list[str]]:
    """(input columns, output columns) for M (all -> all), S (target -> target), MS (all -> target)."""
    if target:
        for t in target:
            if t not in table_columns:
                raise UserError(f"--target {t}: no such numeric column (numeric columns: {', '.join(table_columns)})")
    if mode == "M":
        if target:
            # M with a target list means "these series, all to all".
            return list(target), list(target)
        return list(table_columns), list(table_columns)
    if not target:
        # TSLib's convention: the target is the last column.
        target = [table_columns[-1]]
    if mode == "S":
        return list(target), list(target)
    return list(table_columns), list(target)


# --- splits ---------------------------------------------------------------------------------------------
def resolve_protocol(protocol: Protocol, csv: str | Path | None) -> Protocol:
    """`auto`: the ETT borders for a file named like the ETT data sets (ETTh1.csv, ETTm2.csv, ...), as
    Time-Series-Library picks its loader by data set name; the ratio split for every other file."""
    if protocol != "auto":
        return protocol
    name = Path(csv).name if csv else ""
    if name.startswith("ETTh"):
        return "ett-hour"
    return "ett-minute" if name.startswith("ETTm") else "ratios"


def split_borders(n_rows: int, lookback: int, horizon: int, protocol: Protocol = "ratios",
                  ratios: tuple[float, float, float] = (0.7, 0.1, 0.2)) -> dict[str, tuple[int, int]]:
    """Row ranges [start, end) of train / val / test; val and test include their L rows of context."""
    L = lookback
    if protocol in ("ett-hour", "ett-minute"):
        scale = 1 if protocol == "ett-hour" else 4
        b_train, b_val, b_test = (b * scale for b in ETT_HOUR_BORDERS)
        if n_rows < b_test:
            raise UserError(f"--protocol {protocol}: needs at least {b_test} rows, the CSV has {n_rows}")
        borders = {"train": (0, b_train), "val": (b_train - L, b_val), "test": (b_val - L, b_test)}
    else:
        r_train, _, r_test = ratios  # validation gets the rest, as in TSLib
        n_train, n_test = int(n_rows * r_train), int(n_rows * r_test)
        n_val = n_rows - n_train - n_test
        borders = {"train": (0, n_train), "val": (n_train - L, n_train + n_val),
                   "test": (n_rows - n_test - L, n_rows)}
    for name, (a, b) in borders.items():
        if a < 0 or b - a < L + horizon:
            raise UserError(f"--lookback {L} --horizon {horizon}: the {name} split has {max(b - max(a, 0), 0)} "
                            f"rows, fewer than lookback + horizon = {L + horizon} (use a longer CSV, shorter "
                            "windows, or other --split-ratios)")
    return borders


def n_windows(start: int, end: int, lookback: int, horizon: int) -> int:
    return max(0, end - start - lookback - horizon + 1)


class Windows(Dataset):
    """Every (lookback, horizon) window of stride 1 inside rows [start, end) of `values` (already scaled).

    x: (lookback, n_inputs) of the input columns; y: (horizon, n_outputs) of the output columns."""

    def __init__(self, values: np.ndarray, start: int, end: int, lookback: int, horizon: int,
                 input_idx: list[int], output_idx: list[int]):
        block = torch.as_tensor(values[start:end], dtype=torch.float32)
        self.x_data = block[:, input_idx].contiguous()
        self.y_data = block[:, output_idx].contiguous()
        self.lookback, self.horizon = lookback, horizon
        self.n = n_windows(start, end, lookback, horizon)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        L, H = self.lookback, self.horizon
        return self.x_data[i:i + L], self.y_data[i + L:i + L + H]


@dataclass
class Prepared:
    """A table split, scaled and windowed for one (lookback, horizon, mode)."""
    table: Table
    inputs: list[str]
    outputs: list[str]
    scaler: StandardScaler                     # over `inputs ∪ outputs`, i.e. the `used` columns
    used: list[str]
    scaled: np.ndarray                         # (rows, len(used))
    borders: dict[str, tuple[int, int]]
    lookback: int
    horizon: int
    datasets: dict[str, Windows] = field(default_factory=dict)

    @property
    def input_idx(self) -> list[int]:
        return [self.used.index(c) for c in self.inputs]

    @property
    def output_idx(self) -> list[int]:
        return [self.used.index(c) for c in self.outputs]

    @property
    def output_idx_in_inputs(self) -> list[int]:
        """Where each output column sits among the model's inputs (outputs are always inputs too)."""
        return [self.inputs.index(c) for c in self.outputs]

    @property
    def output_mean(self) -> np.ndarray:
        return self.scaler.mean_[self.output_idx]

    @property
    def output_scale(self) -> np.ndarray:
        return self.scaler.scale_[self.output_idx]


def prepare(table: Table, lookback: int, horizon: int, mode: Mode = "M", target: list[str] | None = None,
            protocol: Protocol = "ratios", ratios: tuple[float, float, float] = (0.7, 0.1, 0.2)) -> Prepared:
    n = len(table.values)
    if n < lookback + horizon:
        raise UserError(f"--csv: {n} rows, fewer than --lookback {lookback} + --horizon {horizon} = "
                        f"{lookback + horizon}")
    inputs, outputs = select_columns(table.columns, mode, target)
    used = [c for c in table.columns if c in inputs or c in outputs]
    raw = table.values[:, [table.columns.index(c) for c in used]]
    borders = split_borders(n, lookback, horizon, protocol, ratios)
    t0, t1 = borders["train"]
    scaler = StandardScaler().fit(raw[t0:t1])  # the training rows only: no peeking at val/test statistics
    scaled = scaler.transform(raw)
    prep = Prepared(table, inputs, outputs, scaler, used, scaled, borders, lookback, horizon)
    for name, (a, b) in borders.items():
        prep.datasets[name] = Windows(scaled, a, b, lookback, horizon, prep.input_idx, prep.output_idx)
    return prep


# --- the embedded default data set --------------------------------------------------------------------
def synthetic_frame(n_rows: int = 24 * 7 * 24, n_series: int = 4, seed: int = 0) -> pd.DataFrame:
    """Hourly multi-series data: trend, daily and weekly seasonality, noise, and a regime change at 60%
    (level jump, stronger daily swing) so that a forecaster must adapt to recent behaviour."""
    rng = np.random.default_rng(seed)
    t = np.arange(n_rows, dtype=np.float64)
    dates = pd.date_range("2024-01-01", periods=n_rows, freq="h")
    regime = (t >= int(0.6 * n_rows)).astype(np.float64)
    cols = {"date": dates.strftime("%Y-%m-%d %H:%M:%S")}
    for k in range(n_series):
        trend = (0.5 + 0.3 * k) * t / n_rows
        daily = (1.0 + 0.2 * k + 0.6 * regime) * np.sin(2 * np.pi * (t / 24 + k / n_series))
        weekly = (0.5 + 0.1 * k) * np.sin(2 * np.pi * t / (24 * 7) + k)
        noise = rng.normal(0, 0.1 + 0.03 * k, n_rows)
        cols[f"series_{k}"] = 10 + 2 * k + trend + daily + weekly + 1.5 * regime * (k % 2 * 2 - 1) + noise
    return pd.DataFrame(cols)
