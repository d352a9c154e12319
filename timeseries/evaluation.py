"""Scoring forecasts on the test windows: run a predictor over a split, MSE/MAE (normalised and in the data's
units), and the predictors of a fitted model and of the naive baselines."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .data import Prepared
from .models import point_forecast, repeat_last, seasonal_naive


@torch.no_grad()
def forecast_windows(predict, ds: Dataset, batch_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Run `predict(x) -> (b, H, C_out)` over every window of `ds`: (forecasts, actuals) on the scaled axis."""
    preds, ys = [], []
    for x, y in DataLoader(ds, batch_size=batch_size, shuffle=False):
        preds.append(predict(x).float())
        ys.append(y)
    return torch.cat(preds).numpy(), torch.cat(ys).numpy()


def error_metrics(pred: np.ndarray, actual: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> dict[str, float]:
    """MSE/MAE on the normalised scale (the protocol's numbers) and in the data's own units."""
    err = pred.astype(np.float64) - actual
    err_orig = err * scale  # inverse scaling: (p*s + m) - (a*s + m)
    return {"test_mse": float(np.mean(err ** 2)), "test_mae": float(np.mean(np.abs(err))),
            "test_mse_original": float(np.mean(err_orig ** 2)), "test_mae_original": float(np.mean(np.abs(err_orig))),
            "n_windows": int(pred.shape[0])}


def model_predictor(model: nn.Module, prep: Prepared):
    idx = torch.tensor(prep.output_idx_in_inputs)
    quantiles = list(getattr(model.cfg, "quantiles", []))
    return lambda x: point_forecast(model(x).index_select(2, idx), quantiles)


def baseline_predictors(prep: Prepared, season: int) -> dict:
    idx = torch.tensor(prep.output_idx_in_inputs)
    H = prep.horizon
    return {"repeat_last": lambda x: repeat_last(x.index_select(2, idx), H),
            "seasonal_naive": lambda x: seasonal_naive(x.index_select(2, idx), H, season)}
