"""The configuration of `python -m timeseries.fit` and the training of one forecaster with Lightning (shared
with the ETTh2 benchmark). Scoring is in evaluation.py, saving and loading in persistence.py."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

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

# What FitConfig's --forecaster.* may override per trial; the other overrides are backbone fields.
OPTION_FIELDS = frozenset(f.name for f in dataclasses.fields(ForecasterOptions))
STAND_IN = {"d_model": 64, "n_layer": 2, "lr": 1e-3}   # for checks before the search has chosen


@dataclass
class SearchableBackbone(MambaConfig):
    """The backbone of `timeseries.fit` (`--model.*`): d_model and n_layer may stay unset (None), to be chosen
    on validation (timeseries/autofit.py)."""
    d_model: int | None = field(default=None, metadata={"help": "default: chosen on validation"})
    n_layer: int | None = field(default=None, metadata={"help": "default: chosen on validation"})

    def __post_init__(self):
        self.chosen()   # MambaConfig's checks, with stand-ins for what is still to be chosen

    def chosen(self, **override) -> MambaConfig:
        """The MambaConfig to build (unset sizes take a stand-in)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(MambaConfig)}
        values.update(override)
        mixer = values["mixer"]
        n_pattern = len(mixer) if isinstance(mixer, (list, tuple)) else len(str(mixer).split(","))
        values["d_model"] = values["d_model"] or STAND_IN["d_model"]
        values["n_layer"] = values["n_layer"] or max(STAND_IN["n_layer"], n_pattern)
        return MambaConfig(**values)


@dataclass
class SearchableOptim(OptimConfig):
    """OptimConfig (`--optim.*`) whose lr may stay unset (None): chosen on validation."""
    lr: float | None = field(default=None, metadata={"help": "peak learning rate (default: chosen on validation)"})

    def __post_init__(self):
        lr = self.lr
        self.lr = lr or STAND_IN["lr"]
        try:
            super().__post_init__()
        finally:
            self.lr = lr
        if lr is not None and lr <= 0:
            raise ValueError(f"--optim.lr: must be > 0, got {lr}")


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
    # Settings left unset (None) are chosen on the validation split by timeseries/autofit.py: lookback,
    # model.d_model, model.n_layer, optim.lr, forecaster.loss (and forecaster.patch_len from the lookback).
    forecaster: ForecasterOptions = field(default_factory=lambda: ForecasterOptions(
        token="patch", patch_len=None, patch_stride=None, loss=None))
    # The backbone; d_input follows the token scheme (--lookback or --forecaster.patch_len).
    model: SearchableBackbone = field(default_factory=lambda: SearchableBackbone(d_state=8, d_input=96))
    # TSLib's schedule: AdamW, the learning rate halved after every epoch.
    optim: SearchableOptim = field(default_factory=lambda: SearchableOptim(schedule="exponential", lr_decay=0.5))
    ridge_init: bool = field(default=True, metadata={
        "help": "start the linear path at its closed-form ridge fit (frozen) and the Mamba head at zero"})
    patience: int = field(default=3, metadata={"help": "early stopping: epochs without validation gain"})
    search_budget: float = field(default=240.0, metadata={
        "help": "seconds of Mamba trials on validation (at least one trial runs); 0: none, the closed-form "
                "linear map alone (lookback and ridge strength are still chosen)"})
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
        return {f"model.{k}": v for k, v in backbone_inputs(options, int(values.get("lookback") or 96)).items()}

    def __post_init__(self):
        super().__post_init__()
        if (self.lookback is not None and self.lookback < 1) or self.horizon < 1:
            raise ValueError("--lookback and --horizon: must be >= 1")
        if len(self.split_ratios) != 3 or any(r <= 0 for r in self.split_ratios) or sum(self.split_ratios) > 1 + 1e-9:
            raise ValueError(f"--split-ratios: expected three positive fractions summing to <= 1, got "
                             f"{self.split_ratios}")
        if self.threads < 0:
            raise ValueError(f"--threads: must be >= 0, got {self.threads}")
        if self.patience < 1:
            raise ValueError("--patience: must be >= 1")
        if self.search_budget < 0:
            raise ValueError(f"--search-budget: must be >= 0, got {self.search_budget}")
        # Validate the model options now (one clear line) rather than after loading the data; settings
        # still to be chosen take a stand-in that passes. The token scheme's backbone inputs (d_input,
        # bidirectional) are filled in; the sizes stay unset until the search chooses them.
        backbone = self.forecaster_config(1, lookback=self.lookback or 96).backbone
        self.model = dataclasses.replace(self.model, **{k: getattr(backbone, k) for k in (
            "d_input", "vocab_size", "complement_map", "bidirectional")})

    def forecaster_config(self, n_series: int, kind: str | None = None, **override) -> ForecasterConfig:
        """The model's config; settings still unset (None) take a stand-in (autofit fills them in first)."""
        lookback = override.pop("lookback", self.lookback)
        options = dataclasses.replace(self.forecaster, **({"kind": kind} if kind else {}),
                                      **{k: v for k, v in override.items() if k in OPTION_FIELDS})
        backbone = self.model.chosen(**{k: v for k, v in override.items() if k not in OPTION_FIELDS})
        return ForecasterConfig(n_series=n_series, lookback=lookback, horizon=self.horizon, options=options,
                                backbone=backbone)

    def with_choices(self, lookback: int | None = None, d_model: int | None = None, n_layer: int | None = None,
                     lr: float | None = None, loss: str | None = None, **options) -> "FitConfig":
        """A copy with these settings filled in (the nested groups copied, never shared)."""
        return dataclasses.replace(
            self, lookback=lookback or self.lookback,
            model=dataclasses.replace(self.model, d_model=d_model or self.model.d_model,
                                      n_layer=n_layer or self.model.n_layer),
            optim=dataclasses.replace(self.optim, lr=lr or self.optim.lr),
            forecaster=dataclasses.replace(self.forecaster, loss=loss or self.forecaster.loss, **options))


def train_model(cfg: FitConfig, prep: Prepared, kind: str | None = None, output_dir: str | None = None,
                model: nn.Module | None = None, val_dataset=None, **trainer_kwargs) -> nn.Module:
    """Fit one forecaster with Lightning (early stopping on validation MSE); returns the best weights.
    `model`: start from these weights (else a new one from `cfg`); `trainer_kwargs`: for lightning.Trainer
    (e.g. max_time, limit_train_batches); `val_dataset`: the windows early stopping watches (default: the
    whole validation split)."""
    from lightning.pytorch.callbacks import EarlyStopping

    from .lightning_module import ForecastModule  # Lightning loads on first use: predict/backtest skip it

    run_cfg = dataclasses.replace(cfg, output_dir=output_dir or cfg.output_dir)
    if output_dir and cfg.resume and not (checkpoint_dir(run_cfg) / "last.ckpt").is_file():
        # A baseline the interrupted run had not started yet: it starts now.
        run_cfg = dataclasses.replace(run_cfg, resume=False)
    task = ForecastModule(cfg.forecaster_config(len(prep.inputs), kind).to_dict(), prep.output_idx_in_inputs,
                          dataclasses.asdict(cfg.optim), cfg.forecaster.loss or "mse")
    if model is not None:   # start from these weights (e.g. the ridge-initialised linear path, frozen)
        task.model = model
    trainer = make_trainer(run_cfg, monitor="val_mse",
                           # Checked after each validation only: a --max-steps run may end mid-epoch without one.
                           # StepSeed + EpochBatches: dropout and data order follow from the step (exact resume).
                           callbacks=[EarlyStopping("val_mse", patience=cfg.patience, mode="min",
                                                    check_on_train_epoch_end=False), StepSeed(cfg.seed)],
                           enable_progress_bar=cfg.progress, enable_model_summary=False,
                           use_distributed_sampler=False, **trainer_kwargs)
    train = prep.datasets["train"]
    train_dl = DataLoader(train, batch_sampler=EpochBatches(len(train), cfg.batch_size, cfg.seed, trainer,
                                                            drop_last=False), num_workers=cfg.num_workers)
    val_dl = DataLoader(prep.datasets["val"] if val_dataset is None else val_dataset, batch_size=max(256, cfg.batch_size), num_workers=cfg.num_workers)
    trainer.fit(task, train_dl, val_dl, ckpt_path=resume_checkpoint(run_cfg))
    best = best_checkpoint(trainer)
    if best is not None:
        state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
        task.load_state_dict(state)
    return task.model.eval()
