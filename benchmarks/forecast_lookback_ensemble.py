"""Would the default recipe's rolling-origin folds choose an ensemble of lookbacks, and would it help?

A diagnostic of the closed-form stage of `timeseries.fit` (docs/timeseries.md, "Limits and honest notes"),
not a model the recipe can return. For one CSV and horizon it takes, for every candidate lookback, the map the
folds score best (`autofit.ridge_path`), and scores the plain average of their forecasts on the same folds
and on the test split, beside the map the recipe chooses (`autofit.choose_linear`):

    python benchmarks/forecast_lookback_ensemble.py --csv ../shared/data/ETTh2.csv --protocol ett-hour \
        --horizons 96 192 336 720 --out ens_etth2.jsonl

Each fold's maps are refitted on the rows before that fold (as `ridge_path` does) and the test forecasts use
the training split's map, as the recipe's model does; one JSON line per horizon.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ssm_core.cli import main_entry  # noqa: E402
from timeseries import autofit  # noqa: E402
from timeseries.data import Prepared, prepare, read_table  # noqa: E402
from timeseries.fit import FitConfig  # noqa: E402


@dataclass
class EnsembleConfig:
    csv: str
    protocol: str = "ratios"
    horizons: list[int] = field(default_factory=lambda: [96, 192, 336, 720])
    out: str | None = field(default=None, metadata={"help": "append one JSON line per horizon here"})


def member_forecasts(prep: Prepared, alpha: float, origins: list[tuple[int, int]]) -> list[np.ndarray]:
    """Deviation-from-last forecasts (origins, outputs, H) of the RevIN-linear map at `alpha`, fitted on
    the training windows that end before each block of origins (at most the training split's)."""
    L, H = prep.lookback, prep.horizon
    inputs = torch.as_tensor(prep.scaled[:, prep.input_idx])
    outputs = torch.as_tensor(prep.scaled[:, prep.output_idx])
    C, t_end = len(prep.output_idx), prep.borders["train"][1]
    out = []
    for origin, n in origins:
        n_train = min(origin, t_end) - L - H + 1
        f, t = autofit._window_features(inputs[:n_train + L + H - 1], L, H)
        beta = autofit._ridge_solutions((f.T @ f).double(), (f.T @ t).double(), [alpha])[0][0]
        fv, _ = autofit._window_features(outputs[origin - L:origin + n + H - 1], L, H)
        out.append((fv.double() @ beta).reshape(-1, C, H).numpy())
    return out


def targets(prep: Prepared, origins: list[tuple[int, int]]) -> list[np.ndarray]:
    L, H, C = prep.lookback, prep.horizon, len(prep.output_idx)
    outputs = torch.as_tensor(prep.scaled[:, prep.output_idx])
    return [autofit._window_features(outputs[o - L:o + n + H - 1], L, H)[1].double().reshape(-1, C, H).numpy()
            for o, n in origins]


def one_horizon(table, cfg: EnsembleConfig, horizon: int) -> dict:
    fit_cfg = FitConfig(csv=cfg.csv, protocol=cfg.protocol, horizon=horizon)
    lookbacks = autofit.lookback_candidates(table, fit_cfg)
    folds, all_fits, members = None, [], []
    for L in lookbacks:
        prep = prepare(table, L, horizon, **autofit.prep_kwargs(fit_cfg))
        folds = folds or autofit.fold_plan(prep, max(lookbacks))
        test = (prep.borders["test"][0] + L, prep.borders["test"][1] - prep.borders["test"][0] - L - horizon + 1)
        fits = autofit.ridge_path(prep, autofit.RIDGE_ALPHAS, folds)
        best = min(fits, key=lambda f: f.cv_mse)
        all_fits += fits
        members.append((best, member_forecasts(prep, best.alpha, folds + [test])))
        truth = targets(prep, folds + [test])          # the same rows for every lookback
    chosen = autofit.choose_linear(all_fits, horizon)
    test_mse = {f.lookback: float(((p[-1] - truth[-1]) ** 2).mean()) for f, p in members}
    naive = min((f for f in all_fits if np.isinf(f.alpha)), key=lambda f: f.cv_mse)
    row = {"csv": cfg.csv, "horizon": horizon,
           "chosen": {**chosen.record(), "test_mse": round(test_mse[chosen.lookback] if not np.isinf(chosen.alpha)
                                                            else float((truth[-1] ** 2).mean()), 4)},
           "members": [{**f.record(), "test_mse": round(test_mse[f.lookback], 4)} for f, _ in members]}
    for name, group in (("all", members), ("best 3", sorted(members, key=lambda m: m[0].cv_mse)[:3])):
        errors = [((np.mean([p[k] for _, p in group], 0) - truth[k]) ** 2).mean((1, 2)) for k in range(len(truth))]
        cv = float(np.exp(np.mean(np.log([max(e.mean(), autofit.TINY_MSE) for e in errors[:-1]]))))
        row[f"ensemble {name}"] = {
            "lookbacks": [f.lookback for f, _ in group], "cv_mse": round(cv, 4),
            "test_mse": round(float(errors[-1].mean()), 4),
            # what the recipe's rules would say: a lower fold score than its choice, and clearly better
            # than repeat-last
            "folds_prefer_it": cv < chosen.cv_mse,
            "clearly_better_than_repeat_last": autofit.clearly_better(errors[:-1], naive.fold_errors, horizon)}
    return row


def main(cfg: EnsembleConfig) -> list[dict]:
    table = read_table(cfg.csv)
    rows = []
    for h in cfg.horizons:
        row = one_horizon(table, cfg, h)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if cfg.out:
            with open(cfg.out, "a") as f:
                f.write(json.dumps(row) + "\n")
    return rows


if __name__ == "__main__":
    main_entry(main, EnsembleConfig, prog="python benchmarks/forecast_lookback_ensemble.py",
               description=__doc__.split("\n")[0])
