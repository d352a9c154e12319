"""Lightning callbacks that keep a training run honest and interruptible.

    trainer = make_trainer(cfg, callbacks=[FiniteGuard(count_metric="val_tokens"),
                                           SignalCheckpoint(checkpoint_dir(cfg))])

* `FiniteGuard` stops training with a `NonFiniteError` (a UserError: one line, exit 2) as soon as the
  training loss or a logged validation metric is NaN or infinite, and when validation saw nothing
  (`count_metric` logged as 0). Lightning's `EarlyStopping(check_finite=True)` also notices a non-finite
  monitor, but it ends the run as a success (the model is exported, exit 0) and watches one metric only.
* `SignalCheckpoint` makes SIGTERM and SIGINT (Ctrl-C) stop training at the next batch boundary, save
  `last.ckpt` (what --resume reads), and end the process with status 128 + the signal. It builds on
  Lightning's own signal handling: Lightning notes SIGTERM (`trainer.received_sigterm`) and raises
  `SIGTERMException` between batches; that exception is a SystemExit without a status, i.e. exit 0, which
  this callback turns into 143 (SIGTERM) or 130 (SIGINT). SIGINT is routed through the same path rather than
  Lightning's KeyboardInterrupt handling (which exits 1 without a checkpoint); a second Ctrl-C interrupts
  at once. It is a plain Callback, not Lightning's `OnExceptionCheckpoint`: that one saves on every exception
  (a NaN run would leave a checkpoint for --resume to pick up), removes its file when a run finishes, and,
  being a `Checkpoint`, could become `trainer.checkpoint_callback`, whose best_model_path callers read.
"""
from __future__ import annotations

import math
import os
import signal
import threading
from collections.abc import Iterable
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException

from .cli import UserError


class NonFiniteError(UserError):
    """Training produced NaN or infinity (or validated on nothing): the run is stopped, not reported."""


def _value(v: Any) -> float:
    if isinstance(v, torch.Tensor):
        return float(v.detach().float().cpu()) if v.numel() == 1 else float("nan")
    return float(v)


class FiniteGuard(Callback):
    """Raise NonFiniteError when the training loss or a validation metric is NaN/inf, or validation is empty.

    monitor: validation metric names to check (default: every logged metric whose name starts with "val").
    count_metric: a logged metric that counts what validation saw (tokens, windows, clips); 0 is an error.
    every_n_steps: check the training loss on every n-th step (each check waits for the GPU)."""

    def __init__(self, monitor: Iterable[str] | None = None, count_metric: str | None = None,
                 every_n_steps: int = 1):
        super().__init__()
        if every_n_steps < 1:
            raise ValueError("FiniteGuard: every_n_steps must be >= 1")
        self.monitor = list(monitor) if monitor is not None else None
        self.count_metric = count_metric
        self.every_n_steps = every_n_steps

    @staticmethod
    def _agree(trainer, bad: bool) -> bool:
        # Every rank must raise together, or the others would wait forever in the next collective.
        return bool(trainer.strategy.reduce_boolean_decision(bad, all=False))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every_n_steps:
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is None:
            return
        value = _value(loss)
        if self._agree(trainer, not math.isfinite(value)):
            raise NonFiniteError(
                f"training loss is {value} at step {trainer.global_step}: training diverged or the data holds "
                "NaN/inf (try a lower --lr, --precision 32-true, or check the input); stopped, nothing exported")

    def on_validation_end(self, trainer, pl_module) -> None:
        metrics = trainer.callback_metrics
        names = self.monitor if self.monitor is not None else [k for k in metrics if k.startswith("val")]
        bad = [(k, _value(metrics[k])) for k in names if k in metrics and not math.isfinite(_value(metrics[k]))]
        if self._agree(trainer, bool(bad)):
            name, value = bad[0] if bad else ("a validation metric", float("nan"))
            raise NonFiniteError(f"validation {name} is {value} at step {trainer.global_step}: training diverged "
                                 "or the data holds NaN/inf; stopped, nothing exported")
        if self.count_metric is not None and self.count_metric in metrics:
            empty = _value(metrics[self.count_metric]) <= 0
            if self._agree(trainer, empty):
                raise NonFiniteError(f"validation saw nothing ({self.count_metric} = 0): the validation data has "
                                     "no usable positions (e.g. only N bases, or too short for one window)")


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """A seed for one (run seed, step or epoch, rank): what a resumed run reproduces from its position alone."""
    return ((seed * 1_000_003 + step) * 1_009 + rank) % 2 ** 63


class StepSeed(Callback):
    """Seed torch's random generators from (seed, global step, rank) before every training batch, so that
    a step's augmentation and dropout depend on its position only: a run resumed at step k draws what the
    uninterrupted run drew there (the generator state is not in a checkpoint, and loading one consumes
    random numbers, e.g. for data-loader seeds)."""

    def __init__(self, seed: int):
        super().__init__()
        self.seed = seed

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        torch.manual_seed(step_seed(self.seed, trainer.global_step, trainer.global_rank))


class SignalCheckpoint(Callback):
    """On SIGTERM / SIGINT: save `<dirpath>/<filename>.ckpt` at the next batch boundary and exit 128 + signal.
    Other exceptions save nothing: a run that failed (e.g. on NaN) must not leave a checkpoint for --resume."""

    def __init__(self, dirpath: str | os.PathLike, filename: str = "last"):
        super().__init__()
        self.ckpt_path = os.path.join(dirpath, f"{filename}.ckpt")
        self.signum: int | None = None
        self._previous_sigint: Any = None
        self._pid = os.getpid()

    def _on_sigint(self, signum, frame) -> None:
        if os.getpid() != self._pid:
            # A data-loader worker forked with this handler (Ctrl-C reaches the whole process group): the
            # main process stops the run and shuts the workers down; a KeyboardInterrupt here would only
            # print a worker's traceback.
            return
        if self.signum == signal.SIGINT:          # the second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signum = signal.SIGINT
        handler = signal.getsignal(signal.SIGTERM)   # Lightning's: marks received_sigterm, tells its workers
        if callable(handler):
            handler(signum, frame)

    # Installed once training starts: Lightning snapshots the signal handlers just before (and restores that
    # snapshot at its teardown), so ours is never left behind.
    def on_train_start(self, trainer, pl_module) -> None:
        if threading.current_thread() is threading.main_thread():
            self._pid = os.getpid()
            self._previous_sigint = signal.signal(signal.SIGINT, self._on_sigint)

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore()

    def _restore(self) -> None:
        if self._previous_sigint is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            self._restore()
            return
        signum = self.signum or signal.SIGTERM
        trainer.save_checkpoint(self.ckpt_path)
        exception.code = 128 + signum
        exception.add_note(f"checkpoint saved at step {trainer.global_step} to {self.ckpt_path}; "
                           "continue with --resume")
        self._restore()
