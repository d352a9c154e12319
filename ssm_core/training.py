"""What the three task packages share around Lightning: the common run flags, the optimiser sub-config and
the one training recipe (AdamW parameter groups, warm-up + cosine schedule), output-folder checks, atomic
checkpoints, and a Trainer built from them.

A package's config dataclass subclasses `TrainConfig` (so every training CLI has the same `--output-dir`,
`--max-steps`, `--max-epochs`, `--batch-size`, `--accelerator`, `--devices`, `--num-nodes`, `--strategy`,
`--precision`, `--seed`, `--resume`, `--deterministic`, `--ema-decay`) and holds an `optim: OptimConfig` (`--optim.lr`,
...); its LightningModule subclasses `TaskModule`, whose `configure_optimizers` is the recipe
(`make_optimizer`).
"""
from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import torch

from .cli import UserError
from .io import atomic_path, write_text_atomic


@dataclass
class TrainConfig:
    output_dir: str = field(default="runs/default", metadata={"help": "where checkpoints, logs and metrics go"})
    max_steps: int = field(default=-1, metadata={"help": "stop after this many optimizer steps (-1: no limit)"})
    max_epochs: int | None = field(default=None, metadata={"help": "stop after this many epochs"})
    batch_size: int = 32
    accelerator: str = field(default="auto", metadata={"help": "cpu, gpu, or auto"})
    # Passed to Lightning's Trainer as given: it takes a count, "0,1" / [0, 1] (device indices), -1, "auto".
    devices: int | str | list[int] = field(default="auto", metadata={
        "help": "number of devices, a list like 0,1, -1 (all) or auto (as Lightning's Trainer takes it)"})
    num_nodes: int = 1
    strategy: str = field(default="auto", metadata={"help": "auto, ddp, fsdp, ..."})
    precision: str | None = field(default=None, metadata={"help": "default: bf16-mixed on GPU, 32 on CPU"})
    seed: int = 0
    resume: bool = field(default=False, metadata={"help": "continue from <output-dir>/checkpoints/last.ckpt"})
    num_workers: int = field(default=0, metadata={"help": "data-loader worker processes"})
    overwrite: bool = field(default=False, metadata={
        "help": "replace the earlier run in --output-dir (only its own files are removed)"})
    # On a GPU two runs of one seed otherwise drift apart like two seeds: the kernels' backward adds some sums
    # with fp32 atomics, in an order that varies (kernels._common.partial_slots).
    deterministic: bool = field(default=False, metadata={
        "help": "bit-identical re-runs on the same GPU and software: torch's deterministic algorithms and the "
                "kernels' backward sums in a fixed order (a little more memory and time; an op with no "
                "deterministic version warns)"})
    # Averaged weights find wider minima, which hold up better on data unlike the training set (SWAD, Cha et
    # al. 2021, for domain generalisation); Lightning's WeightAveraging keeps the average beside the model.
    ema_decay: float | None = field(default=None, metadata={
        "help": "validate, checkpoint and export an exponential moving average of the weights: decay per "
                "optimizer step min(D, (1 + n) / (10 + n)) after n steps, e.g. 0.999 (the raw weights stay in "
                "each checkpoint for --resume)"})

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"--batch-size: must be >= 1, got {self.batch_size}")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(f"--max-steps: must be >= 1 (or -1 for no limit), got {self.max_steps}")
        if self.max_epochs is not None and self.max_epochs < 1:
            raise ValueError(f"--max-epochs: must be >= 1, got {self.max_epochs}")
        if self.num_nodes < 1:
            raise ValueError(f"--num-nodes: must be >= 1, got {self.num_nodes}")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:     # `not`: NaN fails too
            raise ValueError(f"--ema-decay: must be between 0 and 1 (e.g. 0.999), got {self.ema_decay}")


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule (`--optim.*`), one for every task; each task sets its defaults."""
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate"})
    weight_decay: float = field(default=0.0, metadata={
        "help": "AdamW decay of weight matrices (never of norms, biases, A_log, D)"})
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: Literal["cosine", "exponential"] = field(default="cosine", metadata={
        "help": "cosine: linear warm-up, then cosine down to lr x min_lr_ratio, per step; exponential: "
                "lr x lr_decay after each epoch (the TSLib forecasting protocol)"})
    warmup_steps: int = field(default=0, metadata={"help": "linear warm-up steps (cosine schedule)"})
    decay_steps: int | None = field(default=None, metadata={
        "help": "steps from the start to the end of the cosine (default: the run's length; set it to extend "
                "a run with --resume)"})
    min_lr_ratio: float = field(default=0.0, metadata={"help": "the cosine ends at lr x this"})
    lr_decay: float = field(default=0.5, metadata={"help": "exponential schedule: factor per epoch"})
    grad_clip: float | None = field(default=None, metadata={"help": "clip the gradient norm to this (none: off)"})

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"--optim.lr: must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"--optim.weight_decay: must be >= 0, got {self.weight_decay}")
        if self.warmup_steps < 0 or (self.decay_steps is not None and self.decay_steps < 1):
            raise ValueError("--optim.warmup_steps must be >= 0 and --optim.decay_steps >= 1")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"--optim.min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")
        if not 0 < self.lr_decay <= 1:
            raise ValueError(f"--optim.lr_decay: must be in (0, 1], got {self.lr_decay}")
        if self.grad_clip is not None and self.grad_clip < 0:
            raise ValueError(f"--optim.grad_clip: must be >= 0, got {self.grad_clip}")
        self.betas = tuple(self.betas)


def no_weight_decay(name: str, p: torch.nn.Parameter) -> bool:
    """Not decayed: norm weights, biases and the other 1-D parameters (D, dt_proj's bias), and what a module
    marks `_no_weight_decay` (Mamba's A_log, as mamba_ssm marks it)."""
    return p.dim() < 2 or getattr(p, "_no_weight_decay", False) or name.endswith(".bias")


def parameter_groups(model: torch.nn.Module, weight_decay: float,
                     lr_scale: dict[str, float] | None = None) -> list[dict]:
    """AdamW groups [decayed, not decayed] of a model's trainable parameters. `lr_scale` maps a submodule's
    name (e.g. "backbone") to a learning-rate multiplier: then there is one [decayed, not decayed] pair per
    multiplier, each group with its "lr_scale" (1.0 for parameters no name covers), and the same decay rule
    everywhere."""
    scales = lr_scale or {}

    def scale_of(name: str) -> float:
        return next((s for prefix, s in scales.items() if name == prefix or name.startswith(prefix + ".")), 1.0)

    pairs: dict[float, tuple[list, list]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            decay, no_decay = pairs.setdefault(scale_of(name), ([], []))
            (no_decay if no_weight_decay(name, p) else decay).append(p)
    if not scales:
        decay, no_decay = pairs.get(1.0, ([], []))
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for s, (decay, no_decay) in pairs.items()
            for g in ({"params": decay, "weight_decay": weight_decay, "lr_scale": s},
                      {"params": no_decay, "weight_decay": 0.0, "lr_scale": s})]


def warmup_cosine(warmup_steps: int, total_steps: int, min_lr_ratio: float):
    """LR factor of step s: (s + 1) / warmup during the warm-up, then a cosine from 1 down to min_lr_ratio at
    total_steps, flat after. Closed form (LambdaLR), so a resumed run continues on the same curve."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        frac = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac))
    return factor


def make_optimizer(model: torch.nn.Module, optim: OptimConfig, total_steps: int, warmup_steps: int | None = None,
                   lr_scale: dict[str, float] | None = None):
    """The one training recipe: (AdamW over `parameter_groups`, its scheduler, "step" or "epoch").
    `total_steps`: the cosine's length unless optim.decay_steps sets it; `warmup_steps` overrides
    optim.warmup_steps; the warm-up is capped at the cosine's length. `lr_scale`: per-submodule multipliers
    of optim.lr (see `parameter_groups`); the schedule scales every group alike."""
    groups = parameter_groups(model, optim.weight_decay, lr_scale)
    for g in groups:
        g["lr"] = optim.lr * g.get("lr_scale", 1.0)
    opt = torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas)
    if optim.schedule == "exponential":
        return opt, torch.optim.lr_scheduler.ExponentialLR(opt, gamma=optim.lr_decay), "epoch"
    total = optim.decay_steps or max(1, total_steps)
    warm = min(optim.warmup_steps if warmup_steps is None else warmup_steps, total)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(warm, total, optim.min_lr_ratio)), "step"


def lightning_optimizers(model: torch.nn.Module, optim: OptimConfig, total_steps: int,
                         warmup_steps: int | None = None, lr_scale: dict[str, float] | None = None) -> dict:
    """`make_optimizer` in the form LightningModule.configure_optimizers returns."""
    opt, sched, interval = make_optimizer(model, optim, total_steps, warmup_steps, lr_scale)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": interval}}


def run_length(cfg: TrainConfig, unlimited: int = 100_000) -> int:
    """A run's optimizer steps for its schedule: --max-steps, or `unlimited` without a step limit."""
    return cfg.max_steps if cfg.max_steps > 0 else unlimited


def save_run_config(cfg, out_dir: str | os.PathLike, name: str = "config.yaml") -> Path:
    """The run's complete resolved configuration, as `--config` reads it back."""
    from .cli import dump_config
    return write_text_atomic(Path(out_dir) / name, dump_config(cfg))


def prepare_output_dir(path: str | os.PathLike, flag: str = "--output-dir") -> Path:
    """Create the output folder and prove it is writable, before any work is done."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UserError(f"{flag} {p}: exists and is not a folder")
    try:
        p.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=p)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"{flag} {p}: not writable ({e.strerror or e})") from None
    return p


# Set by the launchers of a multi-process run (Lightning's own for --devices N, torchrun, SLURM) in each process.
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")


def prepare_run(cfg: TrainConfig, program: str, owned: Sequence[str],
                checkpoints: Sequence[str] = ("checkpoints",)) -> Path:
    """The run's --output-dir under ssm_core.run_dir's policy (refuse a user's folder, an earlier run only with
    --resume or --overwrite, stale .tmp files removed). Only the first process applies it: Lightning starts the
    other processes of `--devices N` by rerunning the command, when the folder is already this run's.
    `checkpoints`: the folders (globs, relative to the output folder) where this program's trainings keep
    their last.ckpt; --resume needs one of them to hold one."""
    from .run_dir import prepare_run_dir
    if any(os.environ.get(v, "0") not in ("", "0") for v in RANK_VARIABLES):
        return Path(cfg.output_dir)
    if cfg.resume and not cfg.overwrite:
        # nothing to continue from: refused before the folder is touched
        out = Path(cfg.output_dir)
        if not any(p.is_file() for pattern in checkpoints for p in out.glob(f"{pattern}/last.ckpt")):
            raise UserError(f"--resume: no checkpoint to resume from in {out} "
                            f"({' or '.join(f'{c}/last.ckpt' for c in checkpoints)})")
    return prepare_run_dir(cfg.output_dir, resume=cfg.resume, overwrite=cfg.overwrite, program=program, owned=owned)


def weighted_draw(weights: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k item indices drawn by weight: item i comes floor(c_i) or ceil(c_i) times, c_i = k w_i / sum(w), which
    is its expected count exactly (systematic sampling: the items in a random order laid end to end as
    intervals of length c_i, and k points one apart from a uniform start; an item gets the points in its
    interval). So an item of weight 5x the mean comes 5 times, one of half the mean every other draw, and
    an item of weight 0 never. In the items' visiting order (shuffle the result)."""
    visit = torch.randperm(len(weights), generator=generator)
    edges = torch.cumsum(weights[visit] * (k / weights.sum()), 0).clamp(max=k)
    edges[-1] = k                                    # the float sum may miss k by a rounding
    start = torch.rand((), generator=generator, dtype=torch.float64)
    below = torch.ceil(edges - start).clamp(0, k).long()   # how many of the points lie below each edge
    counts = torch.diff(below, prepend=below.new_zeros(1))
    return torch.repeat_interleave(visit, counts)


class EpochBatches(torch.utils.data.Sampler):
    """A batch sampler of shuffled epochs that resumes exactly: epoch e is the permutation seeded by
    (seed, e), and each iteration starts at the run's position, read from the trainer when iteration starts
    (after --resume restored it): a run resumed after step k draws the batches the uninterrupted run drew
    from step k on, where Lightning's own shuffling would start the epoch's order afresh. With several
    processes each takes its share of every epoch (as DistributedSampler; the Trainer needs
    use_distributed_sampler=False). Assumes one batch per optimizer step (no gradient accumulation).

    `weights` (one per item, >= 0, not all 0): an epoch is still n draws, but item i is drawn in proportion
    to its weight (`weighted_draw`: floor or ceil of n w_i / sum(w) times, shuffled), so an item may come
    several times in an epoch, or not at all, and on several ranks. Still a function of (seed, epoch) alone.
    Without weights the epochs are the permutations they always were (a run resumes as it was started)."""

    def __init__(self, n: int, batch_size: int, seed: int, trainer, drop_last: bool = True,
                 weights: Sequence[float] | None = None):
        self.n, self.batch_size, self.seed, self.trainer, self.drop_last = n, batch_size, seed, trainer, drop_last
        self.weights = None
        if weights is not None:
            w = torch.as_tensor(weights, dtype=torch.float64).flatten()
            if len(w) != n:
                raise ValueError(f"EpochBatches: {len(w)} weights for {n} items")
            if not (torch.isfinite(w).all() and (w >= 0).all() and w.sum() > 0):
                raise ValueError("EpochBatches: weights must be finite and >= 0, and not all 0")
            self.weights = w

    def _share(self) -> int:
        return self.n // max(1, self.trainer.world_size)

    def __len__(self) -> int:
        per_rank = self._share()
        return per_rank // self.batch_size if self.drop_last else math.ceil(per_rank / self.batch_size)

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """The item indices of one epoch, every rank's together (rank r takes every world-th from r)."""
        from .callbacks import step_seed
        g = torch.Generator().manual_seed(step_seed(self.seed, epoch))
        if self.weights is None:
            return torch.randperm(self.n, generator=g)
        return weighted_draw(self.weights, self.n, g)[torch.randperm(self.n, generator=g)]

    def __iter__(self):
        batches = len(self)
        epoch, done = divmod(int(self.trainer.global_step), max(1, batches))
        world, rank = max(1, self.trainer.world_size), self.trainer.global_rank
        mine = self.epoch_order(epoch)[rank::world][:self._share()]
        for b in range(done, batches):
            yield mine[b * self.batch_size:(b + 1) * self.batch_size].tolist()


def checkpoint_dir(cfg: TrainConfig) -> Path:
    return Path(cfg.output_dir) / "checkpoints"


def resume_checkpoint(cfg: TrainConfig) -> str | None:
    """Path of the checkpoint to resume from when --resume, else None."""
    if not cfg.resume:
        return None
    last = checkpoint_dir(cfg) / "last.ckpt"
    if not last.is_file():
        raise UserError(f"--resume: no checkpoint to resume from at {last}")
    return str(last)


def best_checkpoint(trainer) -> Path | None:
    """The best checkpoint this run recorded (restored with --resume), or None. Never a `best.ckpt` found
    on disk: one left by an earlier run in the folder is not this run's result."""
    for cb in trainer.checkpoint_callbacks:
        if getattr(cb, "monitor", None) and cb.best_model_path and Path(cb.best_model_path).is_file():
            return Path(cb.best_model_path)
    return None


def resolve_accelerator(cfg: TrainConfig) -> str:
    acc = cfg.accelerator
    if acc not in ("auto", "cpu", "gpu", "cuda"):
        raise UserError(f"--accelerator: expected cpu, gpu or auto; got {acc!r}")
    if acc in ("gpu", "cuda") and not torch.cuda.is_available():
        raise UserError("--accelerator gpu: no CUDA GPU is available on this machine")
    if acc == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    return "gpu" if acc == "cuda" else acc


def default_precision(cfg: TrainConfig) -> str:
    if cfg.precision:
        return cfg.precision
    return "bf16-mixed" if resolve_accelerator(cfg) == "gpu" else "32-true"


def atomic_checkpoint_io():
    """Lightning CheckpointIO that writes each checkpoint to a temporary file and renames it into place."""
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    class AtomicCheckpointIO(TorchCheckpointIO):
        def save_checkpoint(self, checkpoint, path, storage_options=None):
            with atomic_path(path) as tmp:
                torch.save(checkpoint, tmp)

    return AtomicCheckpointIO()


def ema_with_warmup(decay: float):
    """The update of an exponential moving average of weights whose decay grows with the number of updates n
    so far, min(decay, (1 + n) / (10 + n)) (as TensorFlow's ExponentialMovingAverage with num_updates), in the
    form of torch's AveragedModel(multi_avg_fn=...). With a fixed 0.999 the average still holds 55% of the
    first step's weights after 600 steps (9% after 2,400), and an average of weights that far apart is no
    model at all (a CPU run's validated at chance); with the warm-up it spans about the last tenth of the
    steps taken, until that is more than 1 / (1 - decay)."""
    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], n_averaged: torch.Tensor) -> None:
        n = int(n_averaged)            # updates so far, the first (a copy) included; one host sync per step
        weight = 1 - min(decay, (1 + n) / (10 + n))
        if torch.is_floating_point(averaged[0]):     # the tensors come grouped by device and dtype
            torch._foreach_lerp_(averaged, current, weight)
        else:                                        # integer buffers (a step count): the current value
            for a, c in zip(averaged, current):
                a.copy_(c)
    return update


def make_trainer(cfg: TrainConfig, *, monitor: str | None = None, mode: str = "min",
                 callbacks: Sequence[Any] = (), every_n_train_steps: int | None = None, **trainer_kwargs):
    """A Lightning Trainer with the common flags, CSV + TensorBoard logs under <output-dir>/logs, and atomic
    checkpoints under <output-dir>/checkpoints (`last.ckpt` always, `best.ckpt` when `monitor` is given).

    Every run also gets FiniteGuard (a NaN/inf loss or validation metric, or a validation that saw no tokens
    when the module logs `val_tokens`, stops it with one line and exit 2; nothing is exported) and
    SignalCheckpoint (SIGTERM/SIGINT save last.ckpt and end with 143/130); its CSV log keeps the rows of the
    run it resumes."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger

    from .callbacks import FiniteGuard, SignalCheckpoint
    from .loggers import ResumableCSVLogger

    out = prepare_output_dir(cfg.output_dir)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    ckpts = [ModelCheckpoint(dirpath=checkpoint_dir(cfg), filename="last", save_last=False, save_top_k=1,
                             every_n_train_steps=every_n_train_steps, enable_version_counter=False)]
    if monitor:
        # First, so that last.ckpt, written after it at the same validation, holds its updated best score:
        # otherwise a run resumed from there forgets that validation and may export another "best" model.
        ckpts.insert(0, ModelCheckpoint(dirpath=checkpoint_dir(cfg), filename="best", monitor=monitor, mode=mode,
                                        save_top_k=1, enable_version_counter=False))
    if cfg.ema_decay is not None:
        from lightning.pytorch.callbacks import WeightAveraging
        # Validation (so best.ckpt's choice), the checkpoints' state_dict and the weights left at the end of
        # fit are the average; each checkpoint also holds the raw weights, from which --resume continues.
        callbacks = [WeightAveraging(multi_avg_fn=ema_with_warmup(cfg.ema_decay)), *callbacks]
    loggers = [ResumableCSVLogger(out, name="logs", version="", resume=cfg.resume),
               TensorBoardLogger(out, name="logs", version="tb")]
    kwargs = dict(
        default_root_dir=str(out),
        max_steps=cfg.max_steps,
        max_epochs=cfg.max_epochs if cfg.max_epochs is not None else (-1 if cfg.max_steps > 0 else None),
        accelerator=resolve_accelerator(cfg),
        devices=cfg.devices,
        num_nodes=cfg.num_nodes,
        strategy=cfg.strategy,
        precision=default_precision(cfg),
        logger=loggers,
        callbacks=[*ckpts, *callbacks, FiniteGuard(count_metric="val_tokens"), SignalCheckpoint(checkpoint_dir(cfg))],
        plugins=[atomic_checkpoint_io()],
        log_every_n_steps=10,
        gradient_clip_val=(optim.grad_clip or None) if (optim := getattr(cfg, "optim", None)) else None,
        deterministic="warn" if cfg.deterministic else None,
    )
    kwargs.update(trainer_kwargs)
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    try:
        return L.Trainer(**kwargs)
    except MisconfigurationException as e:   # e.g. --devices 3 on a 2-GPU machine, --strategy nope
        raise UserError(f"--devices/--strategy/--precision: {str(e).splitlines()[0]}") from None
