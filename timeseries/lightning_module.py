"""The LightningModule of forecaster training: the loss on the output columns (MSE, MAE or pinball for
quantiles), validation MSE of the point forecast; the optimiser is ssm_core's shared recipe."""
from __future__ import annotations

import torch
from torch import nn

from ssm_core.lightning_module import TaskModule

from .models import ForecasterConfig, build_model, pinball_loss, point_forecast


class ForecastModule(TaskModule):
    """Trains a forecaster on the output columns (the model predicts all inputs; M/S/MS pick)."""

    def __init__(self, forecaster: dict, output_idx: list[int], optim: dict, loss: str = "mse",
                 total_steps: int | None = None):
        """forecaster: ForecasterConfig as a dict; output_idx: the output columns' places among the inputs."""
        super().__init__(optim, total_steps)
        self.save_hyperparameters()
        self.model = build_model(ForecasterConfig.from_dict(forecaster))
        self.quantiles = list(self.model.cfg.quantiles)
        self.register_buffer("output_idx", torch.tensor(output_idx, dtype=torch.long), persistent=False)
        self.loss_name = loss

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
