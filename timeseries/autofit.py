"""The default recipe: settings chosen from the validation split only.

`python -m timeseries.fit --csv data.csv --horizon H` with no model flags calls `choose` here. It never reads
a test row: every candidate is fitted on the training rows and scored on the validation windows.

Stage 1, closed form (seconds): a channel-independent RevIN-linear forecaster (RLinear's architecture)
fitted by ridge regression for every candidate lookback and ridge strength. The ridge prior is "repeat the
last value", not zero: the map predicts the deviation of each normalised future step from the last
normalised value, so strong shrinkage gives repeat-last (the best forecast of a random walk, e.g. exchange
rates) and weak shrinkage the least-squares linear map (seasonal data, e.g. ETT). Lookback and strength are
both chosen on validation MSE.

Stage 2 (Lightning, the time budget): at the chosen lookback, a channel-independent Mamba over patch
tokens learns a correction on top of that linear forecast (`MambaForecaster` with the ridge map as its
frozen linear skip and a zero-initialised head, so training starts from the linear forecast). A small
ordered grid of (model size, loss, learning rate) runs while the budget lasts; the linear forecast alone
is a candidate too, so the recipe never returns something worse on validation than its linear part.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch

from .data import Prepared, Table, prepare
from .models import patch_for  # noqa: F401 (autofit.patch_for: the stage-2 patch length)

LOOKBACKS = (96, 192, 336, 720)
# Ridge strengths relative to the mean feature energy (trace(X'X) / L). The ends are baselines the recipe
# may choose: 0 is the least-squares map (RLinear's exact training optimum), inf exactly repeat-last.
RIDGE_ALPHAS = (0.0, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, float("inf"))
REVIN_EPS = 1e-5  # RevIN's: the same normalisation as models.RevIN
# Rolling-origin folds: the validation split, then up to N_FOLDS - 1 earlier blocks of the training split of
# the same length, each scored by a map fitted only on the rows before it. One validation split is a few
# hundred windows of one period (exchange_rate: 759 rows) and its best map often does not carry over; folds
# over the end of the training period average that luck out.
N_FOLDS = 4
TINY_MSE = 1e-12   # floor of an error before its log (a constant series forecast exactly)


def candidate_lookbacks(n_train_rows: int, horizon: int, base: tuple[int, ...] = LOOKBACKS,
                        min_windows_per_step: float = 2.0) -> list[int]:
    """Lookbacks worth trying: the base list, then doubling beyond 720 while the training split still has
    at least `min_windows_per_step` x lookback windows (a linear map has `lookback` weights per output,
    fitted on windows x series rows); a series too short for 96 gets one shorter lookback."""
    def windows(L: int) -> int:
        return n_train_rows - L - horizon + 1

    out = [L for L in base if windows(L) >= min_windows_per_step * L]
    L = base[-1] * 2
    while windows(L) >= min_windows_per_step * L:
        out.append(L)
        L *= 2
    if not out:  # a short series: the longest shorter lookback with as many windows as steps, else any
        short = (*base, 48, 24, 12)
        fits = [L for L in short if windows(L) >= L] or [L for L in short if windows(L) >= 1]
        out = [max(fits)] if fits else []
    return sorted(set(out))


def fold_plan(prep: Prepared, max_lookback: int, n_folds: int = N_FOLDS) -> list[tuple[int, int]]:
    """(first forecast origin row, number of origins) per fold. Fold 0 is the validation split. Fold k >= 1
    starts k validation-lengths earlier and has as many origins as the validation split has rows; its map is
    fitted on the windows that end before its first origin, and its targets run at most into the validation
    rows, never the test rows. Earlier folds are added while at least half the training split and as many
    windows as the longest lookback has steps remain before them."""
    H = prep.horizon
    t_end, v_end = prep.borders["train"][1], prep.borders["val"][1]
    rows = v_end - t_end
    folds = [(t_end, rows - H + 1)]
    for k in range(1, n_folds):
        origin = t_end - k * rows
        if origin < t_end / 2 or origin - max_lookback - H + 1 < max_lookback:
            break
        folds.append((origin, rows))
    return folds


def _window_features(series: torch.Tensor, lookback: int, horizon: int):
    """series (rows, C) -> per (window, channel) the regression the RevIN-linear map solves exactly.

    The model is y = mean + s * (W xn + b) with xn = (x - mean) / s (RevIN). Its squared error on the
    scaled data is s^2 * |normalised error|^2, so least squares on the data's own scale (the metric) is
    weighted least squares in the normalised space with weights s^2, which is ordinary least squares of
    y - x_last on the features (x - mean, s): the deviations from repeat-last on the de-meaned history and
    on the window's spread (the intercept b). Returns features (N, L+1), targets (N, H), float32."""
    w = series.unfold(0, lookback + horizon, 1).reshape(-1, lookback + horizon).float()  # (n*C, L+H)
    x, y = w[:, :lookback], w[:, lookback:]
    mean = x.mean(1, keepdim=True)
    std = torch.sqrt(x.var(1, keepdim=True, unbiased=False) + REVIN_EPS)
    return torch.cat([x - mean, std], 1), y - x[:, -1:]


def _plain_window_features(series: torch.Tensor, lookback: int, horizon: int):
    """series (rows, C) -> features (x, 1) and targets y per (window, channel): the regression of a linear
    map with a bias on the raw (scaled) history, i.e. DLinear's model (its trend and remainder maps add up
    to one linear map of the history)."""
    w = series.unfold(0, lookback + horizon, 1).reshape(-1, lookback + horizon).float()
    return torch.cat([w[:, :lookback], torch.ones(len(w), 1)], 1), w[:, lookback:]


# name -> (window features, whether the map predicts the deviation from repeat-last)
FEATURES = {"revin": (_window_features, True), "plain": (_plain_window_features, False)}


@dataclass
class RidgeFit:
    lookback: int
    alpha: float
    weight: np.ndarray   # (H, L) map on the normalised history, repeat-last already folded in
    bias: np.ndarray     # (H,)
    val_mse: float       # on the validation split (fold 0)
    dof: float           # effective degrees of freedom per output step (0: repeat-last)
    fold_mse: list[float] = field(default_factory=list)   # per fold, fold 0 first
    # squared error per forecast origin of each fold, in time order (fold 0 first)
    fold_errors: list[np.ndarray] = field(repr=False, default_factory=list)

    @property
    def cv_mse(self) -> float:
        """The selection score: the geometric mean of the folds' MSE. Each fold counts by how much better or
        worse a candidate is there, in ratio; with the plain mean, a fold whose errors are large for every
        candidate (a level shift, a volatile year) would decide alone."""
        return float(np.exp(np.mean(np.log(np.maximum(self.fold_mse, TINY_MSE)))))

    def describe(self) -> str:
        kind = ("repeat-last" if np.isinf(self.alpha) else "least squares" if self.alpha == 0
                else f"ridge alpha {self.alpha:g}")
        return f"lookback {self.lookback}, {kind}"

    def record(self) -> dict:
        return {"lookback": self.lookback, "ridge_alpha": None if np.isinf(self.alpha) else self.alpha,
                "repeat_last": bool(np.isinf(self.alpha)), "val_mse": round(self.val_mse, 5),
                "cv_mse": round(self.cv_mse, 5), "fold_mse": [round(m, 5) for m in self.fold_mse],
                "dof": round(self.dof, 2)}


def _ridge_solutions(xtx: torch.Tensor, xty: torch.Tensor, alphas) -> list[tuple[torch.Tensor, float]]:
    """(coefficients (L+1, H), degrees of freedom) per alpha; every coefficient shrunk towards 0, i.e. the
    forecast towards repeat-last (alpha inf: exactly repeat-last)."""
    evals, evecs = torch.linalg.eigh(xtx)
    proj = evecs.T @ xty
    energy = float(torch.trace(xtx)) / len(xtx)
    out = []
    for alpha in alphas:
        if np.isinf(alpha):
            out.append((torch.zeros_like(xty), 0.0))
            continue
        if alpha == 0:
            # The minimum-norm least-squares solution: the de-meaned history sums to zero, so X'X is singular
            # along that direction, and the pseudo-inverse leaves it out.
            kept = evals > 1e-10 * float(evals.max())
            inv = torch.where(kept, 1.0 / evals.clamp_min(1e-300), torch.zeros_like(evals))
            out.append((evecs @ (proj * inv.unsqueeze(1)), float(kept.sum())))
            continue
        shrink = evals / (evals + alpha * energy)
        out.append((evecs @ (proj / (evals + alpha * energy).unsqueeze(1)), float(shrink.sum())))
    return out


def ridge_path(prep: Prepared, alphas=RIDGE_ALPHAS, folds: list[tuple[int, int]] | None = None,
               chunk: int = 2048, features: str = "revin") -> list[RidgeFit]:
    """Fit the RevIN-linear map (`features="plain"`: a linear map with bias on the raw history) for every
    alpha on the training windows of `prep` (all input series, channel-independent) and score it on each
    rolling-origin fold (`fold_plan`; fold 0, the validation split, uses the map of the whole training
    split, which is the one returned) on the output series."""
    L, H = prep.lookback, prep.horizon
    window_features, from_last = FEATURES[features]
    folds = folds if folds is not None else fold_plan(prep, L)
    inputs = torch.as_tensor(prep.scaled[:, prep.input_idx])
    outputs = torch.as_tensor(prep.scaled[:, prep.output_idx])
    # Sufficient statistics accumulated in time order, in chunks of windows (a long lookback never holds
    # every window at once); each fold reads them as they stand at its first origin.
    xtx = torch.zeros(L + 1, L + 1, dtype=torch.float64)
    xty = torch.zeros(L + 1, H, dtype=torch.float64)
    done = 0                                   # windows (by start row) accumulated so far
    per_fold: dict[int, tuple] = {}
    for k in sorted(range(len(folds)), key=lambda i: folds[i][0]):
        origin, n_origins = folds[k]
        n_train = origin - L - H + 1           # windows whose targets end before the fold's first origin
        for s in range(done, n_train, chunk):
            e = min(n_train, s + chunk)
            f, t = window_features(inputs[s:e + L + H - 1], L, H)
            xtx += (f.T @ f).double()
            xty += (f.T @ t).double()
        done = max(done, n_train)
        fv, tv = window_features(outputs[origin - L:origin - L + n_origins + L + H - 1], L, H)
        fv, tv = fv.double(), tv.double()
        sols = _ridge_solutions(xtx, xty, alphas)
        errors = [((fv @ beta - tv) ** 2).reshape(-1, len(prep.output_idx), H).mean((1, 2)).numpy()
                  for beta, _ in sols]
        per_fold[k] = (sols, errors)
    fits = []
    for i, alpha in enumerate(alphas):
        beta, dof = per_fold[0][0][i]
        weight = beta[:L].T.clone()
        if from_last:
            weight[:, -1] += 1.0                                        # the repeat-last prior, folded in
        errs = [per_fold[k][1][i] for k in range(len(folds))]
        fits.append(RidgeFit(L, alpha, weight.float().numpy(), beta[L].float().numpy(), float(errs[0].mean()),
                             dof, [float(e.mean()) for e in errs], errs))
    return fits


def clearly_better(errors: list[np.ndarray], reference: list[np.ndarray], horizon: int) -> bool:
    """Whether the per-origin squared `errors` (one array per fold) are lower than the `reference`'s by
    more than one standard error, in log ratio of the MSE over blocks of `horizon` consecutive origins
    (origins closer than a horizon share target rows, so their errors are not independent). With fewer
    than two blocks there is too little evidence: False, the reference (the simpler model) stands."""
    ratios = []
    for e, r in zip(errors, reference):
        for be, br in zip(np.array_split(e, max(1, len(e) // horizon)), np.array_split(r, max(1, len(r) // horizon))):
            ratios.append(np.log(max(be.mean(), TINY_MSE)) - np.log(max(br.mean(), TINY_MSE)))
    if len(ratios) < 2:
        return False
    return float(np.mean(ratios) + np.std(ratios, ddof=1) / np.sqrt(len(ratios))) < 0


def choose_linear(fits: list[RidgeFit], horizon: int) -> RidgeFit:
    """The lowest rolling-origin score, unless it is not clearly better than repeat-last (`clearly_better`):
    a fitted map must earn its place against the forecast that needs no fitting. Without a repeat-last
    candidate (no alpha inf): the lowest score."""
    best = min(fits, key=lambda f: f.cv_mse)
    naive = next((f for f in fits if np.isinf(f.alpha)), None)
    if naive is None or best is naive:
        return best
    return best if clearly_better(best.fold_errors, naive.fold_errors, horizon) else naive


def select_linear(table: Table, horizon: int, lookbacks: list[int], prep_kwargs: dict,
                  alphas=RIDGE_ALPHAS, log=print) -> tuple[RidgeFit, list[RidgeFit]]:
    """Every (lookback, alpha) of the closed-form map, scored on the same rolling-origin folds (those the
    longest lookback allows); the chosen one (`choose_linear`) and all of them."""
    all_fits, folds = [], None
    for L in lookbacks:
        prep = prepare(table, L, horizon, **prep_kwargs)
        folds = folds or fold_plan(prep, max(lookbacks))
        fits = ridge_path(prep, alphas, folds)
        best = min(fits, key=lambda f: f.cv_mse)
        log(f"autofit: linear map, best at {best.describe()}: rolling-origin MSE {best.cv_mse:.4f} over "
            f"{len(folds)} fold(s) (validation split {best.val_mse:.4f})")
        all_fits += fits
    return choose_linear(all_fits, horizon), all_fits


# --- stage 2 and the baselines: Lightning fits scored on validation ----------------------------------
# (d_model, n_layer, loss, lr), tried in this order while the budget lasts: the default first, then a
# robust loss (heavy-tailed series), then a larger model. Small first: a CPU must finish a trial in budget.
MAMBA_GRID = ((32, 1, "mse", 1e-3), (32, 1, "mae", 1e-3), (64, 2, "mse", 5e-4), (64, 2, "mae", 5e-4))
EPOCH_BATCHES = 100


@dataclass
class Fitted:
    """A trained forecaster, the data prepared at its lookback, its settings and how they were chosen."""
    model: torch.nn.Module
    prep: Prepared
    cfg: object                      # the FitConfig actually used (every choice filled in)
    val_mse: float
    fit_seconds: float
    record: dict
    linear_fits: list = field(default_factory=list, repr=False)   # every closed-form map the recipe scored


def val_errors(model: torch.nn.Module, prep: Prepared) -> np.ndarray:
    """Squared error per validation window (scaled), in time order."""
    from .evaluation import forecast_windows, model_predictor
    pred, actual = forecast_windows(model_predictor(model, prep), prep.datasets["val"])
    return ((pred.astype(np.float64) - actual) ** 2).mean((1, 2))


def init_from_ridge(model: torch.nn.Module, ridge: RidgeFit) -> torch.nn.Module:
    """Start a RevIN + linear-skip forecaster at the closed-form linear map: the skip takes the ridge
    weights and is frozen, the backbone's head starts at zero, so the first forecast is the linear one and
    training only adds a correction."""
    with torch.no_grad():
        model.skip.weight.copy_(torch.as_tensor(ridge.weight))
        model.skip.bias.copy_(torch.as_tensor(ridge.bias))
        model.head.weight.zero_()
        model.head.bias.zero_()
    model.skip.requires_grad_(False)
    return model


def _ridge_usable(cfg) -> bool:
    o = cfg.forecaster
    return o.kind == "mamba" and o.linear_skip and o.revin and not o.quantiles and cfg.ridge_init


def prep_kwargs(cfg) -> dict:
    return dict(mode=cfg.mode, target=cfg.target, protocol=cfg.protocol, ratios=tuple(cfg.split_ratios))


def train_rows(table: Table, cfg) -> int:
    """Rows of the training split (the same for every lookback)."""
    from .data import split_borders
    # Borders at the smallest window: only the training end is read, and it does not depend on the lookback.
    return split_borders(len(table.values), 1, 1, cfg.protocol, tuple(cfg.split_ratios))["train"][1]


def lookback_candidates(table: Table, cfg) -> list[int]:
    if cfg.lookback is not None:
        return [cfg.lookback]
    out = candidate_lookbacks(train_rows(table, cfg), cfg.horizon)
    if not out:
        from ssm_core.cli import UserError
        raise UserError(f"--csv: the training split ({train_rows(table, cfg)} rows) is too short for "
                        f"--horizon {cfg.horizon} with any lookback")
    return out


def _train(cfg, prep: Prepared, output_dir: Path, kind: str | None = None, model=None, **trainer_kwargs):
    from .train import train_model
    start = time.perf_counter()
    model = train_model(cfg, prep, kind=kind, output_dir=str(output_dir), model=model, **trainer_kwargs)
    return model, time.perf_counter() - start


def fit_linear_baseline(cfg, table: Table, kind: str, out: Path, log=print) -> Fitted:
    """DLinear or RLinear trained like the model (Lightning, early stopping), at every candidate lookback;
    the one with the lowest validation MSE is kept: the same lookback rule as the default recipe."""
    lr = cfg.optim.lr if cfg.optim.lr is not None else MAMBA_GRID[0][3]
    loss = cfg.forecaster.loss if cfg.forecaster.loss is not None else MAMBA_GRID[0][2]
    tried, best = {}, None
    for L in lookback_candidates(table, cfg):
        prep = prepare(table, L, cfg.horizon, **prep_kwargs(cfg))
        bcfg = cfg.with_choices(lookback=L, lr=lr, loss=loss, kind=kind)
        model, secs = _train(bcfg, prep, out / f"L{L}", kind=kind)
        mse = float(val_errors(model, prep).mean())
        tried[L] = round(mse, 5)
        if best is None or mse < best.val_mse:
            best = Fitted(model, prep, bcfg, mse, secs, {})
    best.record = {"lookback": best.prep.lookback, "val_mse_by_lookback": tried, "lr": lr, "loss": loss}
    log(f"autofit: {kind} baseline: lookback {best.prep.lookback} (validation MSE by lookback {tried})")
    return best


def least_squares_baseline(cfg, table: Table, kind: str, revin_fits: list[RidgeFit] = (), log=print) -> Fitted:
    """RLinear or DLinear at the exact optimum of its training objective (MSE on the training windows), in
    closed form: RLinear is the RevIN-linear map with ridge alpha 0 (the recipe's path already holds it),
    DLinear one linear map with bias on the raw history (its trend and remainder maps add up to one). Each
    keeps the candidate lookback with the lowest rolling-origin MSE: the recipe's own lookback rule."""
    from .models import build_model
    start = time.perf_counter()
    lookbacks = lookback_candidates(table, cfg)
    fits = {f.lookback: f for f in revin_fits if f.alpha == 0 and kind == "rlinear"}
    folds = None
    for L in lookbacks:
        if L not in fits:
            prep = prepare(table, L, cfg.horizon, **prep_kwargs(cfg))
            folds = folds or fold_plan(prep, max(lookbacks))
            fits[L] = ridge_path(prep, (0.0,), folds, features="revin" if kind == "rlinear" else "plain")[0]
    best = min((fits[L] for L in lookbacks), key=lambda f: f.cv_mse)
    prep = prepare(table, best.lookback, cfg.horizon, **prep_kwargs(cfg))
    bcfg = cfg.with_choices(lookback=best.lookback, kind=kind, loss="mse")
    model = build_model(bcfg.forecaster_config(len(prep.inputs)))
    weight, bias = torch.as_tensor(best.weight), torch.as_tensor(best.bias)
    with torch.no_grad():
        if kind == "rlinear":
            model.linear.weight.copy_(weight)
            model.linear.bias.copy_(bias)
        else:   # trend map + remainder map = one map when both carry the same weights
            for lin in (model.trend, model.seasonal):
                lin.weight.copy_(weight)
            model.trend.bias.copy_(bias)
            model.seasonal.bias.zero_()
    model.eval()
    record = {"lookback": best.lookback, "fit": "least squares (closed form)",
              "val_mse_by_lookback": {L: round(fits[L].val_mse, 5) for L in lookbacks},
              "cv_mse_by_lookback": {L: round(fits[L].cv_mse, 5) for L in lookbacks}}
    log(f"autofit: {kind} baseline (least squares): lookback {best.lookback} (rolling-origin MSE by lookback "
        f"{record['cv_mse_by_lookback']})")
    return Fitted(model, prep, bcfg, float(val_errors(model, prep).mean()), time.perf_counter() - start, record)


def mamba_grid(cfg) -> list[tuple]:
    """The stage-2 grid with the user's fixed choices substituted (duplicates dropped, order kept)."""
    out = []
    for d, n, loss, lr in MAMBA_GRID:
        entry = (cfg.model.d_model or d, cfg.model.n_layer or n, cfg.forecaster.loss or loss, cfg.optim.lr or lr)
        if entry not in out:
            out.append(entry)
    return out


def stop_and_check_windows(n_windows: int, horizon: int) -> tuple[list[int], list[int]]:
    """The validation windows split into alternating blocks of `horizon` consecutive origins: the even
    blocks for a trial's early stopping and the choice among trials, the odd ones only for the final test
    against the linear map. Scoring a trial on the windows that chose its epoch would flatter it. With one
    block, every window stops and none checks (so no correction is kept)."""
    blocks = np.array_split(np.arange(n_windows), max(1, n_windows // horizon))
    stop = [int(i) for b in blocks[0::2] for i in b]
    check = [int(i) for b in blocks[1::2] for i in b]
    return stop, check


def choose_correction(candidates: list[Fitted], horizon: int, stop: list[int], check: list[int]) -> Fitted:
    """candidates[0] is the linear map alone, the others Mamba corrections of it (early-stopped on the
    `stop` validation windows). The best trial on `stop` replaces the linear map only if it is clearly
    better on the `check` windows (`clearly_better`): one validation split is small, a correction that wins
    by luck there loses on new data, and the linear map is the simpler model."""
    linear = candidates[0]
    if len(candidates) == 1 or not check:
        return linear
    best = min(candidates[1:], key=lambda c: float(c.record["val_errors"][stop].mean()))
    on_check = [best.record["val_errors"][check]], [linear.record["val_errors"][check]]
    return best if clearly_better(*on_check, horizon) else linear


def fit_forecaster(cfg, table: Table, out: Path, log=print) -> Fitted:
    """The model of `timeseries.fit`: every setting left unset (None) in `cfg` is chosen on validation."""
    from .models import build_model
    start = time.perf_counter()
    lookbacks = lookback_candidates(table, cfg)
    record: dict = {"lookback_candidates": lookbacks, "search_budget_seconds": cfg.search_budget}
    if cfg.forecaster.kind != "mamba":
        fitted = fit_linear_baseline(cfg, table, cfg.forecaster.kind, out / "search", log)
        fitted.record = {**record, **fitted.record, "search_seconds": round(time.perf_counter() - start, 1)}
        return fitted
    ridge = None
    if _ridge_usable(cfg):
        ridge, fits = select_linear(table, cfg.horizon, lookbacks, prep_kwargs(cfg), log=log)
        best_by_lookback = {L: min((f for f in fits if f.lookback == L), key=lambda f: f.cv_mse) for L in lookbacks}
        record["linear"] = {**ridge.record(), "n_folds": len(ridge.fold_mse),
                            "best_by_lookback": {L: f.record() for L, f in best_by_lookback.items()}}
        log(f"autofit: linear map chosen: {ridge.describe()} (rolling-origin MSE {ridge.cv_mse:.4f})")
        L = ridge.lookback
    elif len(lookbacks) > 1:
        # No linear part to choose the lookback in closed form: RLinear's validation choice stands in.
        L = fit_linear_baseline(cfg, table, "rlinear", out / "search" / "lookback", log).prep.lookback
    else:
        L = lookbacks[0]
    prep = prepare(table, L, cfg.horizon, **prep_kwargs(cfg))
    patch = cfg.forecaster.patch_len or patch_for(L)
    base = cfg.with_choices(lookback=L, patch_len=patch, patch_stride=cfg.forecaster.patch_stride or patch)
    candidates = []
    if ridge is not None:
        linear_cfg = base.with_choices(d_model=MAMBA_GRID[0][0], n_layer=MAMBA_GRID[0][1], loss=MAMBA_GRID[0][2],
                                       lr=MAMBA_GRID[0][3])
        linear = init_from_ridge(build_model(linear_cfg.forecaster_config(len(prep.inputs))), ridge).eval()
        errors = val_errors(linear, prep)
        candidates.append(Fitted(linear, prep, linear_cfg, float(errors.mean()), time.perf_counter() - start,
                                 {"correction": False, "val_errors": errors}))
        log(f"autofit: linear map alone ({ridge.describe()}): validation MSE "
            f"{candidates[0].val_mse:.4f}")
    search_start, last = time.perf_counter(), 0.0
    stop, check = stop_and_check_windows(len(prep.datasets["val"]), prep.horizon)
    early_stopping_windows = torch.utils.data.Subset(prep.datasets["val"], stop) if ridge is not None else None
    # --search-budget 0: the closed-form map alone, when there is one (else one trial must run).
    grid = mamba_grid(cfg) if cfg.search_budget > 0 or ridge is None else []
    for i, (d, n, loss, lr) in enumerate(grid):
        spent = time.perf_counter() - search_start
        if i > 0 and spent + last > cfg.search_budget:
            log(f"autofit: search budget {cfg.search_budget:g} s reached after {i} trial(s)")
            break
        tcfg = base.with_choices(d_model=d, n_layer=n, loss=loss, lr=lr)
        model = build_model(tcfg.forecaster_config(len(prep.inputs)))
        if ridge is not None:
            init_from_ridge(model, ridge)
        # An epoch is at most EPOCH_BATCHES random batches (shuffled loader), so a long series costs
        # a bounded time per validation check, and the trial stops when the budget is spent.
        model, last = _train(tcfg, prep, out / "search" / f"trial{i}", model=model,
                             max_time=timedelta(seconds=max(cfg.search_budget - spent, 30.0)),
                             limit_train_batches=EPOCH_BATCHES, val_dataset=early_stopping_windows)
        errors = val_errors(model, prep)
        mse = float(errors.mean())
        candidates.append(Fitted(model, prep, tcfg, mse, last, {"correction": True, "val_errors": errors,
                                                                "dir": str(out / "search" / f"trial{i}")}))
        log(f"autofit: trial {i}: d_model {d}, n_layer {n}, loss {loss}, lr {lr:g}: validation MSE {mse:.4f} "
            f"({last:.0f} s)")
    best = (choose_correction(candidates, prep.horizon, stop, check) if ridge is not None
            else min(candidates, key=lambda c: c.val_mse))
    c = best.cfg
    record.update(chosen={"lookback": L, "correction": best.record["correction"], "d_model": c.model.d_model,
                          "n_layer": c.model.n_layer, "loss": c.forecaster.loss, "lr": c.optim.lr,
                          "patch_len": c.forecaster.patch_len, "val_mse": best.val_mse,
                          "checkpoints": best.record.get("dir")},
                  trials=[{"d_model": t.cfg.model.d_model, "n_layer": t.cfg.model.n_layer,
                           "loss": t.cfg.forecaster.loss, "lr": t.cfg.optim.lr,
                           "correction": t.record["correction"], "val_mse": round(t.val_mse, 5),
                           "seconds": round(t.fit_seconds, 1)} for t in candidates],
                  search_seconds=round(time.perf_counter() - start, 1))
    best.record = record
    best.linear_fits = fits if ridge is not None else []
    return best
