"""A fitted forecaster on disk: forecaster.json (model config, columns, scaler, frequency) and
model.safetensors, written by `timeseries.fit`, read by predict and backtest."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn

from ssm_core.cli import UserError
from ssm_core.io import atomic_path, write_json_atomic

from .data import Prepared
from .models import ForecasterConfig, build_model

MODEL_FILES = ("forecaster.json", "model.safetensors")


def save_forecaster(directory: str | Path, model: nn.Module, prep: Prepared, extra: dict | None = None) -> Path:
    """forecaster.json (model config, columns, scaler, frequency) + model.safetensors, each written atomically."""
    from safetensors.torch import save_model
    directory = Path(directory)
    meta = {
        "model": model.cfg.to_dict(),
        "inputs": prep.inputs, "outputs": prep.outputs, "used": prep.used,
        "scaler_mean": prep.scaler.mean_.tolist(), "scaler_scale": prep.scaler.scale_.tolist(),
        "date_col": prep.table.date_col, "freq": prep.table.freq,
        "lookback": prep.lookback, "horizon": prep.horizon, **(extra or {}),
    }
    with atomic_path(directory / "model.safetensors") as tmp:
        save_model(model, str(tmp))
    write_json_atomic(directory / "forecaster.json", meta)
    return directory


@dataclass
class SavedForecaster:
    model: nn.Module
    meta: dict

    @property
    def mean(self) -> np.ndarray:
        return np.asarray(self.meta["scaler_mean"])

    @property
    def scale(self) -> np.ndarray:
        return np.asarray(self.meta["scaler_scale"])

    def index(self, names: list[str]) -> list[int]:
        return [self.meta["used"].index(c) for c in names]


def load_forecaster(path: str | Path, flag: str = "--model") -> SavedForecaster:
    """Load from a fit output folder or its model/ subfolder."""
    from safetensors.torch import load_model
    path = Path(path)
    if not path.exists():
        raise UserError(f"{flag} {path}: no such folder")
    d = path / "model" if (path / "model" / MODEL_FILES[0]).is_file() else path
    if not all((d / f).is_file() for f in MODEL_FILES):
        raise UserError(f"{flag} {path}: not a fitted model (expected {' and '.join(MODEL_FILES)}; run "
                        "python -m timeseries.fit first)")
    try:
        meta = json.loads((d / MODEL_FILES[0]).read_text())
        model = build_model(ForecasterConfig.from_dict(meta["model"]))
        load_model(model, str(d / MODEL_FILES[1]), strict=True)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, RuntimeError) as e:
        raise UserError(f"{flag} {path}: damaged model files ({str(e).splitlines()[0]})") from None
    return SavedForecaster(model.eval(), meta)


def future_dates(last, freq: str | None, horizon: int):
    import pandas as pd
    if last is None or freq is None:
        return None
    return pd.date_range(last, periods=horizon + 1, freq=freq)[1:]
