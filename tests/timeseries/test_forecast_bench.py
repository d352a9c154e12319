"""benchmarks/forecast.py: dataset specs, the table's per-seed averages, missing cells, the PNG."""
import pytest

from benchmarks.forecast import ForecastBenchConfig, parse_dataset, plot, report
from ssm_core.cli import UserError

ROWS = ("model", "rlinear", "dlinear", "repeat_last", "seasonal_naive")


def cell(seed, h, base):
    return {"dataset": "d", "seed": seed, "horizon": h, "wall_seconds": 10.0, "fit_seconds": 5.0,
            "chosen": {"lookback": 96, "correction": seed == 0},
            **{r: {"test_mse": base + i + seed * 0.1, "test_mae": 1.0, **({"lookback": 192} if "linear" in r else {})}
               for i, r in enumerate(ROWS)}}


def test_parse_dataset():
    assert parse_dataset("a/b/ETTh2.csv:ett-hour") == ("ETTh2", "a/b/ETTh2.csv", "ett-hour")
    assert parse_dataset("x.csv") == ("x", "x.csv", "ratios")
    with pytest.raises(UserError, match="unknown protocol"):
        parse_dataset("x.csv:weekly")


def test_report_averages_per_seed_and_lists_missing_cells(tmp_path):
    cfg = ForecastBenchConfig(datasets=["d.csv"], horizons=[96, 192], seeds=[0, 1])
    results = [cell(0, 96, 1.0), cell(0, 192, 2.0), cell(1, 96, 1.0)]
    table = report(cfg, results)
    model_row = next(line for line in table.splitlines() if "default recipe" in line)
    # Only seed 0 has both horizons: its average (1.0 + 2.0) / 2, one seed counted.
    assert "| 1.500 |" in model_row and model_row.endswith("| 1 |")
    assert "1.050 ± 0.050" in model_row                      # H=96 over seeds 0 and 1
    assert "Missing cells (dataset, seed, horizon): ('d', 1, 192)" in table
    assert "correction kept in 1/2 seeds" in table
    plot(cfg, results, tmp_path / "t.png")
    assert (tmp_path / "t.png").stat().st_size > 1000
