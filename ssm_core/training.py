"""What the three task packages share around Lightning: the common training flags, output-folder checks,
atomic checkpoints, and a Trainer built from them.

A package's config dataclass subclasses `TrainConfig` (so every training CLI has the same `--output-dir`,
`--max-steps`, `--max-epochs`, `--batch-size`, `--accelerator`, `--devices`, `--num-nodes`, `--strategy`,
`--precision`, `--seed`, `--resume`) and calls `make_trainer`.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from .cli import UserError
from .io import FILE_MODE


@dataclass
class TrainConfig:
    output_dir: str = field(default="runs/default", metadata={"help": "where checkpoints, logs and metrics go"})
    max_steps: int = field(default=-1, metadata={"help": "stop after this many optimizer steps (-1: no limit)"})
    max_epochs: int | None = field(default=None, metadata={"help": "stop after this many epochs"})
    batch_size: int = 32
    accelerator: str = field(default="auto", metadata={"help": "cpu, gpu, or auto"})
    devices: str = field(default="auto", metadata={"help": "number of devices, a list like 0,1, or auto"})
    num_nodes: int = 1
    strategy: str = field(default="auto", metadata={"help": "auto, ddp, fsdp, ..."})
    precision: str | None = field(default=None, metadata={"help": "default: bf16-mixed on GPU, 32 on CPU"})
    seed: int = 0
    resume: bool = field(default=False, metadata={"help": "continue from <output-dir>/checkpoints/last.ckpt"})
    num_workers: int = field(default=0, metadata={"help": "data-loader worker processes"})

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"--batch-size: must be >= 1, got {self.batch_size}")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(f"--max-steps: must be >= 1 (or -1 for no limit), got {self.max_steps}")
        if self.max_epochs is not None and self.max_epochs < 1:
            raise ValueError(f"--max-epochs: must be >= 1, got {self.max_epochs}")
        if self.num_nodes < 1:
            raise ValueError(f"--num-nodes: must be >= 1, got {self.num_nodes}")


def mixer_field(default: str = "mamba"):
    """The `--mixer` option every package's config has (validate it with ssm_core.check_mixer_spec)."""
    return field(default=default, metadata={
        "help": "mixer per layer: a name (mamba, mamba2, s4d, attention) or a comma-separated pattern"})


def residual_in_fp32_field():
    """The `--residual-in-fp32 / --no-residual-in-fp32` option every package's config has (MambaConfig's)."""
    return field(default=True, metadata={
        "help": "keep the residual stream in float32 (mamba_ssm's option); off: in the dtype the embedding or "
                "input projection produces (bf16 under --precision bf16-true; a linear input projection gives "
                "bf16 under bf16-mixed too)"})


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


def parse_devices(devices: str) -> Any:
    s = str(devices).strip()
    if s == "auto":
        return "auto"
    if s.isdigit() or (s.startswith("-") and s[1:].isdigit()):
        return int(s)
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--devices: expected a number, a list like 0,1, or auto; got {devices!r}") from None


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
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            os.close(fd)
            try:
                torch.save(checkpoint, tmp)
                os.chmod(tmp, FILE_MODE)
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)

    return AtomicCheckpointIO()


def make_trainer(cfg: TrainConfig, *, monitor: str | None = None, mode: str = "min",
                 callbacks: Sequence[Any] = (), every_n_train_steps: int | None = None, **trainer_kwargs):
    """A Lightning Trainer with the common flags, CSV + TensorBoard logs under <output-dir>/logs, and atomic
    checkpoints under <output-dir>/checkpoints (`last.ckpt` always, `best.ckpt` when `monitor` is given)."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    out = prepare_output_dir(cfg.output_dir)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    ckpts = [ModelCheckpoint(dirpath=checkpoint_dir(cfg), filename="last", save_last=False, save_top_k=1,
                             every_n_train_steps=every_n_train_steps, enable_version_counter=False)]
    if monitor:
        ckpts.append(ModelCheckpoint(dirpath=checkpoint_dir(cfg), filename="best", monitor=monitor, mode=mode,
                                     save_top_k=1, enable_version_counter=False))
    loggers = [CSVLogger(out, name="logs", version=""), TensorBoardLogger(out, name="logs", version="tb")]
    kwargs = dict(
        default_root_dir=str(out),
        max_steps=cfg.max_steps,
        max_epochs=cfg.max_epochs if cfg.max_epochs is not None else (-1 if cfg.max_steps > 0 else None),
        accelerator=resolve_accelerator(cfg),
        devices=parse_devices(cfg.devices),
        num_nodes=cfg.num_nodes,
        strategy=cfg.strategy,
        precision=default_precision(cfg),
        logger=loggers,
        callbacks=[*ckpts, *callbacks],
        plugins=[atomic_checkpoint_io()],
        log_every_n_steps=10,
    )
    kwargs.update(trainer_kwargs)
    return L.Trainer(**kwargs)
