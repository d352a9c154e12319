"""timeseries: long-horizon forecasting on CSV files with Mamba forecasters (ssm_core).

    python -m timeseries.fit --csv data.csv --horizon 96 --lookback 96 --output-dir runs/mine
    python -m timeseries.predict --model runs/mine --csv new.csv
    python -m timeseries.backtest --model runs/mine --csv data.csv --folds 8

Library use: `read_table` / `prepare` (data.py), `MambaForecaster`, `DLinear`, `ForecasterConfig`
(models.py), `FitConfig`, `train_model` (train.py), `ForecastModule` (lightning_module.py), scoring
(evaluation.py), `save_forecaster` / `load_forecaster` (persistence.py).
"""
from .data import Prepared, Table, prepare, read_table, split_borders, synthetic_frame, table_from_frame
from .models import (
           DLinear,
           ForecasterConfig,
           ForecasterOptions,
           MambaForecaster,
           RevIN,
           build_model,
           pinball_loss,
)
from .persistence import load_forecaster, save_forecaster
from .train import FitConfig, train_model

__all__ = [
           "DLinear",
           "FitConfig",
           "ForecasterConfig",
           "ForecasterOptions",
           "MambaForecaster",
           "Prepared",
           "RevIN",
           "Table",
           "build_model",
           "load_forecaster",
           "pinball_loss",
           "prepare",
           "read_table",
           "save_forecaster",
           "split_borders",
           "synthetic_frame",
           "table_from_frame",
           "train_model",
]
