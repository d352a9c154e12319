"""The base of the three packages' LightningModules: the optimiser sub-config and the one training recipe.

A subclass builds `self.model` in its `__init__` (after `super().__init__(optim, total_steps)` and its own
`save_hyperparameters()`), and writes its steps; `configure_optimizers` is the shared recipe of
ssm_core.training (AdamW parameter groups, warm-up + cosine or per-epoch decay).
"""
from __future__ import annotations

import lightning as L
from torch import nn

from .training import OptimConfig, lightning_optimizers


class TaskModule(L.LightningModule):
    def __init__(self, optim: dict, total_steps: int | None = None):
        """optim: an OptimConfig as a dict (plain data, so it is saved in the checkpoint's hyperparameters);
        total_steps: the schedule's length (default: the Trainer's estimate of the run's steps)."""
        super().__init__()
        self.optim = OptimConfig(**optim)
        self.total_steps = total_steps

    def warmup_steps(self, total_steps: int) -> int:
        """The warm-up of a run of `total_steps` (default: the OptimConfig's)."""
        return self.optim.warmup_steps

    def lr_scale(self) -> dict[str, float] | None:
        """Learning-rate multipliers of `self.model`'s submodules by name (default: none, one lr)."""
        return None

    def optimized_module(self) -> nn.Module:
        """What the optimiser trains: `self.model`, or more where a subclass has training-only parts."""
        return self.model

    def configure_optimizers(self):
        total = self.total_steps or max(1, int(self.trainer.estimated_stepping_batches))
        return lightning_optimizers(self.optimized_module(), self.optim, total, self.warmup_steps(total),
                                    self.lr_scale())
