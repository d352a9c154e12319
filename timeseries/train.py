"""Training, evaluation and persistence shared by `fit`, `predict`, `backtest` and the ETTh2 benchmark."""
from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ssm_core import check_mixer_spec
from ssm_core.cli import UserError
from ssm_core.io import atomic_path, write_json_atomic
from ssm_core.training import (
    TrainConfig,
    checkpoint_dir,
    make_trainer,
    mixer_field,
    residual_in_fp32_field,
    resume_checkpoint,
)

from .data import Mode, Prepared, Protocol
from .models import ForecasterConfig, build_model, pinball_loss, point_forecast, repeat_last, seasonal_naive

MODEL_FILES = ("forecaster.json", "model.safetensors")


def plain_warnings() -> None:
    """Command-line warnings as one line `warning: ...`, without the library's file and line."""
    warnings.formatwarning = lambda msg, *_a, **_k: f"warning: {msg}\n"


@dataclass
class FitConfig(TrainConfig):
    """Everything `python -m timeseries.fit` takes (the common training flags come from TrainConfig)."""
    output_dir: str = field(default="runs/timeseries", metadata={"help": "metrics, forecast, plot, model"})
    max_epochs: int | None = field(default=10, metadata={"help": "stop after this many epochs (early "
                                                                "stopping on validation may stop sooner)"})
    batch_size: int = 32
    csv: str | None = field(default=None, metadata={"help": "input CSV; without it an embedded synthetic "
                                                          "multi-series data set is generated"})
    date_col: str | None = field(default=None, metadata={"help": "the date column (default: detected)"})
    target: list[str] | None = field(default=None, metadata={"help": "target column(s) (default: all "
                                                                     "numeric; S/MS: the last column)"})
    mode: Mode = field(default="M", metadata={"help": "M all->all, S target->target, MS all->target"})
    protocol: Protocol = field(default="auto", metadata={"help": "split borders: ratios (see --split-ratios), "
                                                                 "the TSLib ETT borders, or auto (ETT borders "
                                                                 "for ETTh*/ETTm* files, else ratios)"})
    split_ratios: list[float] = field(default_factory=lambda: [0.7, 0.1, 0.2],
                                      metadata={"help": "train val test fractions (protocol ratios)"})
    # Settings left unset (None) are chosen on the validation split by timeseries/autofit.py.
    lookback: int | None = field(default=None, metadata={"help": "history length (default: chosen on "
                                                                  "validation among 96..720 and longer)"})
    horizon: int = 96
    # model
    model: Literal["mamba", "dlinear", "rlinear"] = "mamba"
    token: Literal["variate", "patch"] = field(default="patch", metadata={
        "help": "patch: channel-independent patches over time (the default recipe); variate: one token per "
                "series, bidirectional scan (S-Mamba)"})
    d_model: int | None = field(default=None, metadata={"help": "default: chosen on validation"})
    n_layer: int | None = field(default=None, metadata={"help": "default: chosen on validation"})
    d_state: int = 8
    mixer: str = mixer_field()
    residual_in_fp32: bool = residual_in_fp32_field()
    patch_len: int | None = field(default=None, metadata={"help": "default: lookback / 48, at least 8"})
    patch_stride: int | None = field(default=None, metadata={"help": "default: the patch length"})
    dropout: float = 0.1
    revin: bool = True
    linear_skip: bool = field(default=True, metadata={"help": "add a linear lookback->horizon path (RLinear)"})
    ridge_init: bool = field(default=True, metadata={
        "help": "start the linear path at its closed-form ridge fit (frozen) and the Mamba head at zero"})
    quantiles: list[float] = field(default_factory=list, metadata={
        "help": "train quantile outputs with the pinball loss, e.g. 0.1 0.5 0.9 (must include 0.5)"})
    # optimisation
    lr: float | None = field(default=None, metadata={"help": "default: chosen on validation"})
    lr_decay: float = field(default=0.5, metadata={"help": "learning rate factor per epoch (TSLib: 0.5)"})
    weight_decay: float = 0.0
    loss: Literal["mse", "mae"] | None = field(default=None, metadata={"help": "default: chosen on validation"})
    patience: int = field(default=3, metadata={"help": "early stopping: epochs without validation gain"})
    search_budget: float = field(default=240.0, metadata={
        "help": "seconds for the model search on validation (lookback, size, loss, lr); at least one trial runs"})
    # evaluation
    season: int | None = field(default=None, metadata={"help": "seasonal-naive period (default: from the "
                                                                "date frequency, e.g. 24 for hourly)"})
    baselines: bool = field(default=True, metadata={"help": "also fit/evaluate repeat-last, seasonal naive, "
                                                            "DLinear"})
    progress: bool = field(default=True, metadata={"help": "show progress bars"})
    threads: int = field(default=1, metadata={
        "help": "CPU threads for torch ops (0: torch's default). The models are small, so one thread is "
                "about as fast alone and far faster on a busy machine, where threads spin against each other"})

    def __post_init__(self):
        super().__post_init__()
        check_mixer_spec(self.mixer)
        if (self.lookback is not None and self.lookback < 1) or self.horizon < 1:
            raise ValueError("--lookback and --horizon: must be >= 1")
        if len(self.split_ratios) != 3 or any(r <= 0 for r in self.split_ratios) or sum(self.split_ratios) > 1 + 1e-9:
            raise ValueError(f"--split-ratios: expected three positive fractions summing to <= 1, got "
                             f"{self.split_ratios}")
        if (self.lr is not None and self.lr <= 0) or not 0 < self.lr_decay <= 1:
            raise ValueError("--lr must be > 0 and --lr-decay in (0, 1]")
        if self.threads < 0:
            raise ValueError(f"--threads: must be >= 0, got {self.threads}")
        if self.patience < 1:
            raise ValueError("--patience: must be >= 1")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"--dropout: must be in [0, 1), got {self.dropout}")
        if self.search_budget < 0:
            raise ValueError(f"--search-budget: must be >= 0, got {self.search_budget}")
        # Validate the model options now (one clear line) rather than after loading the data; settings
        # still to be chosen take a stand-in that passes.
        patch = self.patch_len or 16
        self.forecaster_config(1, lookback=self.lookback or max(patch, 96), d_model=self.d_model or 8,
                               n_layer=self.n_layer or 1, patch_len=patch, patch_stride=self.patch_stride or patch)

    def forecaster_config(self, n_series: int, kind: str | None = None, **override) -> ForecasterConfig:
        """The model's config; every setting must be chosen by now (autofit fills the unset ones)."""
        values = dict(
            n_series=n_series, lookback=self.lookback, horizon=self.horizon, kind=kind or self.model,
            token=self.token, d_model=self.d_model, n_layer=self.n_layer, d_state=self.d_state, mixer=self.mixer,
            patch_len=self.patch_len, patch_stride=self.patch_stride, dropout=self.dropout, revin=self.revin,
            linear_skip=self.linear_skip, quantiles=list(self.quantiles), residual_in_fp32=self.residual_in_fp32)
        values.update(override)
        if values["patch_len"] is not None and values["patch_stride"] is None:
            values["patch_stride"] = values["patch_len"]
        for name in ("d_model", "n_layer", "patch_len", "patch_stride"):
            if values[name] is None:  # not used by the linear models: ForecasterConfig's default stands
                values.pop(name)
        return ForecasterConfig(**values)


def _lightning_module():
    import lightning as L

    class ForecastTask(L.LightningModule):
        """Trains a forecaster on the output columns (the model predicts all inputs; M/S/MS pick)."""

        def __init__(self, model: nn.Module, output_idx: list[int], lr: float, lr_decay: float,
                     weight_decay: float, loss: str):
            super().__init__()
            self.model = model
            self.quantiles = list(model.cfg.quantiles)
            self.register_buffer("output_idx", torch.tensor(output_idx, dtype=torch.long), persistent=False)
            self.lr, self.lr_decay, self.weight_decay, self.loss_name = lr, lr_decay, weight_decay, loss

        def predict_outputs(self, x):
            return self.model(x).index_select(2, self.output_idx)

        def _loss(self, pred, y):
            if self.quantiles:
                return pinball_loss(pred, y, self.quantiles)
            return nn.functional.mse_loss(pred, y) if self.loss_name == "mse" else nn.functional.l1_loss(pred, y)

        def training_step(self, batch, _):
            x, y = batch
            loss = self._loss(self.predict_outputs(x), y)
            self.log("train_loss", loss, prog_bar=True)
            return loss

        def validation_step(self, batch, _):
            x, y = batch
            pred = point_forecast(self.predict_outputs(x), self.quantiles)
            # Weighted by batch size so the epoch value is the MSE over every validation window.
            self.log("val_mse", nn.functional.mse_loss(pred, y), prog_bar=True, batch_size=len(x))

        def configure_optimizers(self):
            opt = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
            sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=self.lr_decay)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    return ForecastTask


def train_model(cfg: FitConfig, prep: Prepared, kind: str | None = None, output_dir: str | None = None,
                model: nn.Module | None = None, **trainer_kwargs) -> nn.Module:
    """Fit one forecaster with Lightning (early stopping on validation MSE); returns the best weights.
    `model`: start from these weights (else a new one from `cfg`); `trainer_kwargs`: for lightning.Trainer
    (e.g. max_time, limit_train_batches)."""
    from lightning.pytorch.callbacks import EarlyStopping

    run_cfg = dataclasses.replace(cfg, output_dir=output_dir or cfg.output_dir)
    model = model if model is not None else build_model(cfg.forecaster_config(len(prep.inputs), kind))
    task = _lightning_module()(model, prep.output_idx_in_inputs, cfg.lr, cfg.lr_decay, cfg.weight_decay, cfg.loss)
    gen = torch.Generator().manual_seed(cfg.seed)
    train_dl = DataLoader(prep.datasets["train"], batch_size=cfg.batch_size, shuffle=True, generator=gen,
                          num_workers=cfg.num_workers)
    val_dl = DataLoader(prep.datasets["val"], batch_size=max(256, cfg.batch_size), num_workers=cfg.num_workers)
    trainer = make_trainer(run_cfg, monitor="val_mse",
                           # Checked after each validation only: a --max-steps run may end mid-epoch without one.
                           callbacks=[EarlyStopping("val_mse", patience=cfg.patience, mode="min",
                                                    check_on_train_epoch_end=False)],
                           enable_progress_bar=cfg.progress, enable_model_summary=False, **trainer_kwargs)
    trainer.fit(task, train_dl, val_dl, ckpt_path=resume_checkpoint(run_cfg))
    best = checkpoint_dir(run_cfg) / "best.ckpt"
    if best.is_file():
        state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
        task.load_state_dict(state)
    return task.model.eval()


# --- evaluation -----------------------------------------------------------------------------------------
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


# --- persistence ---------------------------------------------------------------------------------------
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
        model = build_model(ForecasterConfig(**meta["model"]))
        load_model(model, str(d / MODEL_FILES[1]), strict=True)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, RuntimeError) as e:
        raise UserError(f"{flag} {path}: damaged model files ({str(e).splitlines()[0]})") from None
    return SavedForecaster(model.eval(), meta)


def future_dates(last, freq: str | None, horizon: int):
    import pandas as pd
    if last is None or freq is None:
        return None
    return pd.date_range(last, periods=horizon + 1, freq=freq)[1:]

