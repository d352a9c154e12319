"""The configuration of `python -m timeseries.fit` and the training of one forecaster with Lightning (shared
with the ETTh2 benchmark). Scoring is in evaluation.py, saving and loading in persistence.py."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn
from torch.utils.data import DataLoader

from ssm_core import MambaConfig
from ssm_core.callbacks import StepSeed
from ssm_core.training import (
    EpochBatches,
    OptimConfig,
    TrainConfig,
    best_checkpoint,
    checkpoint_dir,
    make_trainer,
    resume_checkpoint,
)

from .data import Mode, Prepared, Protocol
from .models import ForecasterConfig, ForecasterOptions, backbone_inputs


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
    protocol: Protocol = field(default="ratios", metadata={"help": "split borders: ratios (see "
                                                                   "--split-ratios) or the TSLib ETT borders"})
    split_ratios: list[float] = field(default_factory=lambda: [0.7, 0.1, 0.2],
                                      metadata={"help": "train val test fractions (protocol ratios)"})
    lookback: int = 96
    horizon: int = 96
    forecaster: ForecasterOptions = field(default_factory=ForecasterOptions)
    # The backbone; d_input follows the token scheme (--lookback or --forecaster.patch_len).
    model: MambaConfig = field(default_factory=lambda: MambaConfig(d_model=64, n_layer=2, d_state=8, d_input=96))
    # TSLib's schedule: AdamW, the learning rate halved after every epoch.
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, schedule="exponential", lr_decay=0.5))
    loss: Literal["mse", "mae"] = "mse"
    patience: int = field(default=3, metadata={"help": "early stopping: epochs without validation gain"})
    # evaluation
    season: int | None = field(default=None, metadata={"help": "seasonal-naive period (default: from the "
                                                                "date frequency, e.g. 24 for hourly)"})
    baselines: bool = field(default=True, metadata={"help": "also fit/evaluate repeat-last, seasonal naive, "
                                                            "DLinear"})
    progress: bool = field(default=True, metadata={"help": "show progress bars"})
    threads: int = field(default=1, metadata={
        "help": "CPU threads for torch ops (0: torch's default). The models are small, so one thread is "
                "about as fast alone and far faster on a busy machine, where threads spin against each other"})

    DERIVED = {"model.d_input": "--lookback or --forecaster.patch_len", "model.vocab_size": "series input",
               "model.complement_map": "series input"}
    MOVED_FLAGS = {"model": "forecaster.kind"}   # `--model mamba|dlinear` of before

    @classmethod
    def derive(cls, values: dict) -> dict:
        options = ForecasterOptions(**values.get("forecaster", {}))
        return {f"model.{k}": v for k, v in backbone_inputs(options, int(values.get("lookback", 96))).items()}

    def __post_init__(self):
        super().__post_init__()
        if self.lookback < 1 or self.horizon < 1:
            raise ValueError("--lookback and --horizon: must be >= 1")
        if len(self.split_ratios) != 3 or any(r <= 0 for r in self.split_ratios) or sum(self.split_ratios) > 1 + 1e-9:
            raise ValueError(f"--split-ratios: expected three positive fractions summing to <= 1, got "
                             f"{self.split_ratios}")
        if self.threads < 0:
            raise ValueError(f"--threads: must be >= 0, got {self.threads}")
        if self.patience < 1:
            raise ValueError("--patience: must be >= 1")
        # Validate the model options now (one clear line) rather than after loading the data.
        self.model = self.forecaster_config(1).backbone

    def forecaster_config(self, n_series: int, kind: str | None = None) -> ForecasterConfig:
        options = self.forecaster if kind is None else dataclasses.replace(self.forecaster, kind=kind)
        return ForecasterConfig(n_series=n_series, lookback=self.lookback, horizon=self.horizon, options=options,
                                backbone=self.model)


def train_model(cfg: FitConfig, prep: Prepared, kind: str | None = None, output_dir: str | None = None) -> nn.Module:
    """Fit one forecaster with Lightning (early stopping on validation MSE); returns the best weights."""
    from lightning.pytorch.callbacks import EarlyStopping

    from .lightning_module import ForecastModule  # Lightning loads on first use: predict/backtest skip it

    run_cfg = dataclasses.replace(cfg, output_dir=output_dir or cfg.output_dir)
    if output_dir and cfg.resume and not (checkpoint_dir(run_cfg) / "last.ckpt").is_file():
        # A baseline the interrupted run had not started yet: it starts now.
        run_cfg = dataclasses.replace(run_cfg, resume=False)
    task = ForecastModule(cfg.forecaster_config(len(prep.inputs), kind).to_dict(), prep.output_idx_in_inputs,
                          dataclasses.asdict(cfg.optim), cfg.loss)
    trainer = make_trainer(run_cfg, monitor="val_mse",
                           # Checked after each validation only: a --max-steps run may end mid-epoch without one.
                           # StepSeed + EpochBatches: dropout and data order follow from the step (exact resume).
                           callbacks=[EarlyStopping("val_mse", patience=cfg.patience, mode="min",
                                                    check_on_train_epoch_end=False), StepSeed(cfg.seed)],
                           enable_progress_bar=cfg.progress, enable_model_summary=False,
                           use_distributed_sampler=False)
    train = prep.datasets["train"]
    train_dl = DataLoader(train, batch_sampler=EpochBatches(len(train), cfg.batch_size, cfg.seed, trainer,
                                                            drop_last=False), num_workers=cfg.num_workers)
    val_dl = DataLoader(prep.datasets["val"], batch_size=max(256, cfg.batch_size), num_workers=cfg.num_workers)
    trainer.fit(task, train_dl, val_dl, ckpt_path=resume_checkpoint(run_cfg))
    best = best_checkpoint(trainer)
    if best is not None:
        state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
        task.load_state_dict(state)
    return task.model.eval()
