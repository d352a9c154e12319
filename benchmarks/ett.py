"""ETTh2 long-horizon table: seeds x horizons of `timeseries.fit`, mean ± std, with our own baselines.

    python benchmarks/ett.py --csv ../shared/data/ETTh2.csv --output-dir runs/ett          # run (resumable)
    python benchmarks/ett.py --output-dir runs/ett --report-only                           # table from results

Each (seed, horizon) fit appends one line to <output-dir>/results.jsonl as soon as it ends, so a run that
is stopped keeps what finished and a rerun skips it. Seeds are the outer loop: seed 0 covers all horizons
first. The report (table.md, table.png) says which cells are missing.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ssm_core.cli import load_yaml_config, main_entry
from ssm_core.io import save_figure_atomic, write_text_atomic
from ssm_core.training import prepare_output_dir
from timeseries.fit import fit
from timeseries.train import FitConfig

REPO = Path(__file__).resolve().parents[1]
PUBLISHED = {"S-Mamba": 0.381, "iTransformer": 0.383, "PatchTST": 0.387}  # avg MSE, lookback 96 (papers)
ROWS = ("model", "dlinear", "repeat_last", "seasonal_naive")


@dataclass
class EttConfig:
    csv: str = field(default="../shared/data/ETTh2.csv", metadata={"help": "ETTh2.csv"})
    output_dir: str = "runs/ett"
    fit_config: str = field(default=str(REPO / "configs/timeseries/etth2.yaml"),
                            metadata={"help": "timeseries.fit options (YAML)"})
    horizons: list[int] = field(default_factory=lambda: [96, 192, 336, 720])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    report_only: bool = False
    target_mse: float = 0.375


def run_cell(cfg: EttConfig, seed: int, horizon: int) -> dict:
    out = Path(cfg.output_dir) / f"h{horizon}_s{seed}"
    fit_cfg = load_yaml_config(FitConfig, cfg.fit_config, ["--csv", cfg.csv, "--horizon", str(horizon), "--seed",
                                                           str(seed), "--output-dir", str(out), "--no-progress"])
    start = time.perf_counter()
    metrics = fit(fit_cfg)
    return {"seed": seed, "horizon": horizon, "wall_seconds": round(time.perf_counter() - start, 1),
            "fit_seconds": metrics["fit_seconds"], "epochs_config": fit_cfg.max_epochs,
            "model": {k: metrics[k] for k in ("test_mse", "test_mae")},
            **{name: {k: m[k] for k in ("test_mse", "test_mae")} for name, m in metrics["baselines"].items()}}


def load_results(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def mean_std(values: list[float]) -> str:
    if not values:
        return "—"
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def report(cfg: EttConfig, results: list[dict]) -> str:
    horizons = cfg.horizons
    lines = [(f"ETTh2, multivariate, lookback 96, protocol ett-hour; test MSE / MAE (normalised), mean ± std "
              f"over seeds; config {Path(cfg.fit_config).name}"), ""]
    lines.append("| model | " + " | ".join(f"H={h} MSE | H={h} MAE" for h in horizons) + " | avg MSE | avg MAE | seeds |")
    lines.append("|---" * (2 * len(horizons) + 4) + "|")
    for row in ROWS:
        cells, seeds_done = [], set()
        per_seed_avg = {"test_mse": {}, "test_mae": {}}
        for h in horizons:
            rs = [r for r in results if r["horizon"] == h and row in r]
            for metric in ("test_mse", "test_mae"):
                cells.append(mean_std([r[row][metric] for r in rs]))
            for r in rs:
                for metric in ("test_mse", "test_mae"):
                    per_seed_avg[metric].setdefault(r["seed"], {})[h] = r[row][metric]
        # The average over horizons per seed, then mean ± std over seeds that have all horizons.
        avgs = {}
        for metric, by_seed in per_seed_avg.items():
            full = [np.mean(list(v.values())) for s, v in by_seed.items() if len(v) == len(horizons)]
            seeds_done = {s for s, v in by_seed.items() if len(v) == len(horizons)}
            avgs[metric] = mean_std(full)
        name = "Mamba (ours)" if row == "model" else row
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {avgs['test_mse']} | {avgs['test_mae']} | "
                     f"{len(seeds_done)} |")
    lines.append("")
    lines.append("Published (lookback 96, avg MSE): " + ", ".join(f"{k} {v}" for k, v in PUBLISHED.items()))
    times = [r["wall_seconds"] for r in results]
    if times:
        by_h = {h: [r["wall_seconds"] for r in results if r["horizon"] == h] for h in horizons}
        lines.append("Wall time per fit command (model + DLinear + naive baselines), seconds: " + ", ".join(
            f"H={h} {np.mean(v):.0f} (max {np.max(v):.0f})" for h, v in by_h.items() if v))
        fit_only = [r["fit_seconds"] for r in results]
        lines.append(f"Mamba training alone: mean {np.mean(fit_only):.0f} s, max {np.max(fit_only):.0f} s")
    missing = [(s, h) for s in cfg.seeds for h in horizons
               if not any(r["seed"] == s and r["horizon"] == h for r in results)]
    if missing:
        lines.append("Missing cells (seed, horizon): " + ", ".join(map(str, missing)))
    return "\n".join(lines) + "\n"


def plot(cfg: EttConfig, results: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for row in ROWS:
        hs = [h for h in cfg.horizons if any(r["horizon"] == h for r in results)]
        m = [np.mean([r[row]["test_mse"] for r in results if r["horizon"] == h]) for h in hs]
        s = [np.std([r[row]["test_mse"] for r in results if r["horizon"] == h]) for h in hs]
        ax.errorbar(hs, m, yerr=s, marker="o", capsize=3, label="Mamba (ours)" if row == "model" else row)
    ax.set_xlabel("horizon")
    ax.set_ylabel("test MSE (normalised)")
    ax.set_xticks(cfg.horizons)
    ax.set_title("ETTh2, lookback 96")
    ax.legend()
    save_figure_atomic(fig, path)


def main(cfg: EttConfig) -> None:
    out = prepare_output_dir(cfg.output_dir)
    results_path = out / "results.jsonl"
    if not cfg.report_only:
        for seed in cfg.seeds:
            for h in cfg.horizons:
                if any(r["seed"] == seed and r["horizon"] == h for r in load_results(results_path)):
                    continue
                print(f"ett: seed {seed} horizon {h}", file=sys.stderr, flush=True)
                append_row(results_path, run_cell(cfg, seed, h), "ett")
    write_report(cfg, results_path, out, report, plot)


def append_row(results_path: Path, row: dict, tag: str) -> None:
    """One line per cell, appended when the cell is done (a rerun skips the cells already there)."""
    with results_path.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(f"{tag}: {json.dumps(row)}", file=sys.stderr, flush=True)


def write_report(cfg, results_path: Path, out: Path, report, plot) -> None:
    """table.md (and table.png when there are rows) from every row so far; the table on stdout."""
    results = load_results(results_path)
    table = report(cfg, results)
    write_text_atomic(out / "table.md", table)
    if results:
        plot(cfg, results, out / "table.png")
    print(table)


if __name__ == "__main__":
    main_entry(main, EttConfig, prog="python benchmarks/ett.py", description=__doc__.split("\n")[0])
