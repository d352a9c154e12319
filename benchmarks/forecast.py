"""Long-horizon table of the default recipe: datasets x horizons x seeds of `timeseries.fit` with no model
flags (every setting chosen on validation), mean ± std, next to every baseline of the same harness.

    python benchmarks/forecast.py --datasets ../shared/data/ETTh2.csv:ett-hour ../shared/data/exchange_rate.csv \
        --output-dir runs/forecast                                        # run (resumable)
    python benchmarks/forecast.py --output-dir runs/forecast --report-only   # table + PNG from results

A dataset is `PATH[:PROTOCOL]` (protocol ratios by default, TSLib's 0.7/0.1/0.2). Each (dataset, seed,
horizon) fit appends one line to <output-dir>/results.jsonl as soon as it ends, so a stopped run keeps what
finished and a rerun skips it. `--workers N` runs N cells at once, each in its own process with one torch
thread (the models are small; on a machine with N free cores this is N times faster); the longest cells
(longest horizon) start first, seeds stay the outer order. Each cell's log goes to
<output-dir>/logs/<dataset>_h<H>_s<seed>.log; the console shows one line per started and finished cell.
`--accelerator gpu` trains the Mamba trials on the GPU (all workers share it; `--precision`, fp32 by default);
the closed-form maps and baselines run on the CPU either way. `--time-limit S`: no cell starts after S s.
The report (table.md, table.png) says which cells are missing.
"""
from __future__ import annotations

import contextlib
import logging
import multiprocessing
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
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
NAMES = {"model": "default recipe (ours)", "rlinear": "rlinear (least squares)", "dlinear": "dlinear (least squares)"}


@dataclass
class ForecastBenchConfig:
    datasets: list[str] = field(default_factory=lambda: ["../shared/data/ETTh2.csv:ett-hour",
                                                         "../shared/data/exchange_rate.csv"],
                                metadata={"help": "CSV[:protocol] each (protocol: ratios, ett-hour, ett-minute)"})
    output_dir: str = "runs/forecast"
    horizons: list[int] = field(default_factory=lambda: [96, 192, 336, 720])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    search_budget: float = field(default=240.0, metadata={"help": "timeseries.fit --search-budget"})
    accelerator: str = field(default="cpu", metadata={"help": "timeseries.fit --accelerator (cpu, gpu, auto); "
                                                              "the cells share the one GPU"})
    precision: str = field(default="32-true", metadata={
        "help": "timeseries.fit --precision; fp32 also on a GPU, where bf16 would round the linear maps (the "
                "closed-form one and the baselines) that the table compares"})
    workers: int = field(default=1, metadata={"help": "cells run at once, one process and one torch thread each"})
    time_limit: float | None = field(default=None, metadata={
        "help": "seconds after which no further cell starts (those running finish; a rerun does the rest)"})
    report_only: bool = False

    def __post_init__(self):
        if self.workers < 1:
            raise ValueError(f"--workers: must be >= 1, got {self.workers}")
        if self.search_budget < 0:
            raise ValueError(f"--search-budget: must be >= 0, got {self.search_budget}")
        if self.time_limit is not None and self.time_limit <= 0:
            raise ValueError(f"--time-limit: must be > 0, got {self.time_limit}")


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
    # A cell interrupted mid-fit left a partial run folder: it is that cell's own earlier run, replaced.
    fit_cfg = FitConfig(csv=path, protocol=protocol, horizon=horizon, seed=seed, output_dir=str(out),
                        search_budget=cfg.search_budget, progress=False, accelerator=cfg.accelerator,
                        precision=cfg.precision, overwrite=out.is_dir())
    start = time.perf_counter()
    log = Path(cfg.output_dir) / "logs" / f"{name}_h{horizon}_s{seed}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    # Lightning's info lines ("GPU available", ...) go through logging, not sys.stderr: warnings only, so
    # that the console of N workers shows the cells' progress lines.
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    with log.open("w") as f, contextlib.redirect_stderr(f), contextlib.redirect_stdout(f):
        metrics = fit(fit_cfg)
    chosen = metrics["selection"].get("chosen", {})
    return {"dataset": name, "seed": seed, "horizon": horizon, "wall_seconds": round(time.perf_counter() - start, 1),
            "accelerator": cfg.accelerator, "search_budget": cfg.search_budget,
            "fit_seconds": metrics["fit_seconds"], "chosen": chosen,
            "model": {k: metrics[k] for k in ("test_mse", "test_mae")},
            **{b: {k: m[k] for k in ("test_mse", "test_mae")} | ({"lookback": m["lookback"]} if "lookback" in m else {})
               for b, m in metrics["baselines"].items()}}


def report(cfg: ForecastBenchConfig, results: list[dict]) -> str:
    hs = cfg.horizons
    lines = ["Test MSE (normalised), mean ± std over seeds; every choice of every row (the lookback of the fitted "
             "rows too) made on rolling-origin folds of the training and validation rows only", ""]
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


def pending_cells(cfg: ForecastBenchConfig, results: list[dict]) -> list[tuple[str, int, int]]:
    """(dataset spec, seed, horizon) not in the results yet: seeds first, the longest horizon first within a
    seed (the slowest cells start early, so parallel workers finish together)."""
    done = {(r["dataset"], r["seed"], r["horizon"]) for r in results}
    return [(spec, seed, h) for seed in cfg.seeds for h in sorted(cfg.horizons, reverse=True)
            for spec in cfg.datasets if (parse_dataset(spec)[0], seed, h) not in done]


def run_cells(cfg: ForecastBenchConfig, results_path: Path, run=run_cell) -> None:
    """Every pending cell, `--workers` at a time; the parent alone appends to results.jsonl, as each ends.
    `run(cfg, spec, seed, horizon) -> row`: a module-level function (the workers import it)."""
    todo = pending_cells(cfg, load_results(results_path))
    total, start = len(todo), time.perf_counter()

    def may_start() -> bool:
        if cfg.time_limit is None or time.perf_counter() - start < cfg.time_limit or not todo:
            return True
        print(f"forecast: --time-limit {cfg.time_limit:g} s reached, {len(todo)} cell(s) not started (a rerun "
              "does them)", file=sys.stderr, flush=True)
        todo.clear()
        return False

    def started(spec, seed, h):
        print(f"forecast: start {parse_dataset(spec)[0]} seed {seed} horizon {h}", file=sys.stderr, flush=True)

    def finished(n_done, row):
        append_row(results_path, row, "forecast")
        print(f"forecast: {n_done}/{total} cells done, {time.perf_counter() - start:.0f} s", file=sys.stderr,
              flush=True)

    if cfg.workers == 1:
        n_done = 0
        while todo and may_start():
            cell = todo.pop(0)
            started(*cell)
            n_done += 1
            finished(n_done, run(cfg, *cell))
        return
    # fork on the CPU: the parent only schedules (it never runs a torch op, so there is no thread pool to
    # inherit) and a forked worker skips re-importing torch. spawn when a GPU may be used: a CUDA driver
    # touched in the parent (an availability check) does not survive a fork.
    fork = cfg.accelerator == "cpu" and "fork" in multiprocessing.get_all_start_methods()
    method = "fork" if fork else "spawn"
    with ProcessPoolExecutor(cfg.workers, mp_context=multiprocessing.get_context(method)) as pool:
        running, n_done = {}, 0
        while todo or running:
            while todo and len(running) < cfg.workers and may_start():
                cell = todo.pop(0)
                started(*cell)
                running[pool.submit(run, cfg, *cell)] = cell
            ended, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in ended:
                running.pop(future)
                n_done += 1
                finished(n_done, future.result())


def main(cfg: ForecastBenchConfig) -> None:
    for spec in cfg.datasets:
        parse_dataset(spec)
    out = prepare_output_dir(cfg.output_dir)
    results_path = out / "results.jsonl"
    if not cfg.report_only:
        run_cells(cfg, results_path)
    write_report(cfg, results_path, out, report, plot)


if __name__ == "__main__":
    main_entry(main, ForecastBenchConfig, prog="python benchmarks/forecast.py", description=__doc__.split("\n")[0])
