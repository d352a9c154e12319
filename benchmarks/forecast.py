"""Long-horizon table of the default recipe: datasets x horizons x seeds of `timeseries.fit` with no model
flags (every setting chosen on validation), mean ± std, next to every baseline of the same harness.

    python benchmarks/forecast.py --datasets ../shared/data/ETTh2.csv:ett-hour ../shared/data/exchange_rate.csv \
        --output-dir runs/forecast                                        # run (resumable)
    python benchmarks/forecast.py --output-dir runs/forecast --report-only   # table + PNG from results

A dataset is `PATH[:PROTOCOL]` (protocol ratios by default, TSLib's 0.7/0.1/0.2). Each (dataset, seed,
horizon) fit appends one line to <output-dir>/results.jsonl as soon as it ends, so a stopped run keeps what
finished and a rerun skips it. Seeds are the outer loop (seed 0 covers every dataset and horizon first).
The report (table.md, table.png) says which cells are missing.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.ett import append_row, load_results, mean_std, write_report
from ssm_core.cli import UserError, main_entry
from ssm_core.io import save_figure_atomic
from ssm_core.training import prepare_output_dir
from timeseries.fit import fit
from timeseries.train import FitConfig

ROWS = ("model", "rlinear", "dlinear", "repeat_last", "seasonal_naive")
NAMES = {"model": "default recipe (ours)"}


@dataclass
class ForecastBenchConfig:
    datasets: list[str] = field(default_factory=lambda: ["../shared/data/ETTh2.csv:ett-hour",
                                                         "../shared/data/exchange_rate.csv"],
                                metadata={"help": "CSV[:protocol] each (protocol: ratios, ett-hour, ett-minute)"})
    output_dir: str = "runs/forecast"
    horizons: list[int] = field(default_factory=lambda: [96, 192, 336, 720])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    search_budget: float = field(default=240.0, metadata={"help": "timeseries.fit --search-budget"})
    report_only: bool = False


def parse_dataset(spec: str) -> tuple[str, str, str]:
    """'path[:protocol]' -> (name, path, protocol)."""
    path, _, protocol = spec.partition(":")
    protocol = protocol or "ratios"
    if protocol not in ("ratios", "ett-hour", "ett-minute"):
        raise UserError(f"--datasets {spec}: unknown protocol {protocol!r} (ratios, ett-hour, ett-minute)")
    return Path(path).stem, path, protocol


def run_cell(cfg: ForecastBenchConfig, spec: str, seed: int, horizon: int) -> dict:
    name, path, protocol = parse_dataset(spec)
    out = Path(cfg.output_dir) / name / f"h{horizon}_s{seed}"
    fit_cfg = FitConfig(csv=path, protocol=protocol, horizon=horizon, seed=seed, output_dir=str(out),
                        search_budget=cfg.search_budget, progress=False)
    start = time.perf_counter()
    metrics = fit(fit_cfg)
    chosen = metrics["selection"].get("chosen", {})
    return {"dataset": name, "seed": seed, "horizon": horizon, "wall_seconds": round(time.perf_counter() - start, 1),
            "fit_seconds": metrics["fit_seconds"], "chosen": chosen,
            "model": {k: metrics[k] for k in ("test_mse", "test_mae")},
            **{b: {k: m[k] for k in ("test_mse", "test_mae")} | ({"lookback": m["lookback"]} if "lookback" in m else {})
               for b, m in metrics["baselines"].items()}}


def report(cfg: ForecastBenchConfig, results: list[dict]) -> str:
    hs = cfg.horizons
    lines = ["Test MSE (normalised), mean ± std over seeds; every setting of every row chosen on the validation "
             "split (lookback for all trained rows)", ""]
    lines.append("| dataset | model | " + " | ".join(f"H={h}" for h in hs) + " | avg MSE | avg MAE | seeds |")
    lines.append("|---" * (len(hs) + 5) + "|")
    for spec in cfg.datasets:
        name = parse_dataset(spec)[0]
        rs_data = [r for r in results if r["dataset"] == name]
        for row in ROWS:
            cells = [mean_std([r[row]["test_mse"] for r in rs_data if r["horizon"] == h and row in r]) for h in hs]
            avgs = {}
            seeds_done = [s for s in cfg.seeds
                          if all(any(r["seed"] == s and r["horizon"] == h and row in r for r in rs_data) for h in hs)]
            for metric in ("test_mse", "test_mae"):
                avgs[metric] = mean_std([np.mean([r[row][metric] for r in rs_data if r["seed"] == s and row in r])
                                         for s in seeds_done])
            lines.append(f"| {name} | {NAMES.get(row, row)} | " + " | ".join(cells) +
                         f" | {avgs['test_mse']} | {avgs['test_mae']} | {len(seeds_done)} |")
    lines.append("")
    for spec in cfg.datasets:
        name = parse_dataset(spec)[0]
        for h in hs:
            rs = [r for r in results if r["dataset"] == name and r["horizon"] == h]
            if rs:
                ch = [r["chosen"] for r in rs]
                lines.append(f"{name} H={h}: chosen lookback {sorted({c.get('lookback') for c in ch})}, Mamba "
                             f"correction kept in {sum(bool(c.get('correction')) for c in ch)}/{len(ch)} seeds; "
                             f"baseline lookbacks rlinear {sorted({r['rlinear'].get('lookback') for r in rs})}, "
                             f"dlinear {sorted({r['dlinear'].get('lookback') for r in rs})}; fit of the chosen "
                             f"settings {np.mean([r['fit_seconds'] for r in rs]):.0f} s, whole command "
                             f"{np.mean([r['wall_seconds'] for r in rs]):.0f} s (mean)")
    missing = [(parse_dataset(d)[0], s, h) for d in cfg.datasets for s in cfg.seeds for h in hs
               if not any(r["dataset"] == parse_dataset(d)[0] and r["seed"] == s and r["horizon"] == h
                          for r in results)]
    if missing:
        lines.append("Missing cells (dataset, seed, horizon): " + ", ".join(map(str, missing)))
    return "\n".join(lines) + "\n"


def plot(cfg: ForecastBenchConfig, results: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = [parse_dataset(d)[0] for d in cfg.datasets]
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4), squeeze=False)
    for name, ax in zip(names, axes[0]):
        rs_data = [r for r in results if r["dataset"] == name]
        for row in ROWS:
            hs = [h for h in cfg.horizons if any(r["horizon"] == h and row in r for r in rs_data)]
            vals = [[r[row]["test_mse"] for r in rs_data if r["horizon"] == h and row in r] for h in hs]
            ax.errorbar(hs, [np.mean(v) for v in vals], yerr=[np.std(v) for v in vals], marker="o", capsize=3,
                        label=NAMES.get(row, row))
        ax.set_xlabel("horizon")
        ax.set_ylabel("test MSE (normalised)")
        ax.set_xticks(cfg.horizons)
        ax.set_title(name)
    axes[0, 0].legend(fontsize=8)
    save_figure_atomic(fig, path)


def main(cfg: ForecastBenchConfig) -> None:
    for spec in cfg.datasets:
        parse_dataset(spec)
    out = prepare_output_dir(cfg.output_dir)
    results_path = out / "results.jsonl"
    if not cfg.report_only:
        for seed in cfg.seeds:
            for spec in cfg.datasets:
                name = parse_dataset(spec)[0]
                for h in cfg.horizons:
                    if any(r["dataset"] == name and r["seed"] == seed and r["horizon"] == h
                           for r in load_results(results_path)):
                        continue
                    print(f"forecast: {name} seed {seed} horizon {h}", file=sys.stderr, flush=True)
                    append_row(results_path, run_cell(cfg, spec, seed, h), "forecast")
    write_report(cfg, results_path, out, report, plot)


if __name__ == "__main__":
    main_entry(main, ForecastBenchConfig, prog="python benchmarks/forecast.py", description=__doc__.split("\n")[0])
