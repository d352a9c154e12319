"""Forecasters: (batch, lookback, n_inputs) scaled history -> (batch, horizon, n_inputs[, n_quantiles]).

* `MambaForecaster`: RevIN (per-window normalisation) around a Mamba backbone from `ssm_core`, with one of
  two token schemes, and a direct multi-horizon head (all H steps at once, no autoregression):
    - `variate` (S-Mamba / iTransformer): each series' whole lookback is one token; a bidirectional Mamba
      mixes the series (the order of series is arbitrary, so the scan runs both ways).
    - `patch` (PatchTST-style, channel-independent): each series is cut into overlapping patches over time,
      every series goes through the same causal Mamba on its own.
  A linear map lookback -> horizon on the normalised history (RLinear) is added to the Mamba head: the
  backbone only has to learn what a linear forecaster misses, which keeps small data sets such as ETT from
  overfitting while the Mamba path captures the cross-series / nonlinear structure.
* `DLinear` (Zeng et al. 2023): moving-average trend + remainder, one linear map each. A trained baseline.
* `RLinear` (Li et al. 2023): RevIN + one linear map lookback -> horizon shared by all series. A trained
  baseline, and the linear part of `MambaForecaster` on its own.
* `repeat_last`, `seasonal_naive`: the untrained baselines.

Every model predicts all its input series; the caller picks the output columns (M/S/MS modes).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ssm_core import MambaConfig, MambaModel


@dataclass
class ForecasterOptions:
    """What a forecaster adds around its backbone (`--forecaster.*` on the command line)."""
    kind: Literal["mamba", "dlinear", "rlinear"] = "mamba"
    token: Literal["variate", "patch"] = field(default="variate", metadata={
        "help": "variate: one token per series, bidirectional scan (S-Mamba); patch: channel-independent "
                "patches over time (causal unless --model.bidirectional)"})
    patch_len: int | None = field(default=16, metadata={"help": "steps per patch (none: lookback / 24, at "
                                                                "least 8)"})
    patch_stride: int | None = field(default=8, metadata={"help": "none: the patch length"})
    dropout: float = 0.1
    revin: bool = True
    linear_skip: bool = field(default=True, metadata={"help": "add a linear lookback->horizon path (RLinear)"})
    moving_avg: int = 25                # DLinear's trend window
    loss: Literal["mse", "mae"] | None = field(default="mse", metadata={
        "help": "training loss of point forecasts (none: chosen on validation by timeseries.fit)"})
    quantiles: list[float] = field(default_factory=list, metadata={
        "help": "train quantile outputs with the pinball loss, e.g. 0.1 0.5 0.9 (must include 0.5)"})

    def __post_init__(self):
        for name in ("patch_len", "patch_stride", "moving_avg"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--forecaster.{name}: must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"--forecaster.dropout: must be in [0, 1), got {self.dropout}")
        if any(not 0 < q < 1 for q in self.quantiles):
            raise ValueError(f"--forecaster.quantiles: each must be in (0, 1), got {self.quantiles}")
        if self.quantiles and 0.5 not in self.quantiles:
            raise ValueError("--forecaster.quantiles: include 0.5 (the median is the point forecast)")
        self.quantiles = sorted(self.quantiles)

    @property
    def n_outputs(self) -> int:
        return max(1, len(self.quantiles))


def default_backbone() -> MambaConfig:
    return MambaConfig(d_model=128, n_layer=2, d_state=16, d_input=1)


@dataclass
class ForecasterConfig:
    n_series: int
    lookback: int
    horizon: int
    options: ForecasterOptions = field(default_factory=ForecasterOptions)
    # d_input is the token's length (lookback or patch_len); variate tokens always scan both ways (the
    # order of series is arbitrary), patches as backbone.bidirectional says.
    backbone: MambaConfig = field(default_factory=default_backbone)

    def __post_init__(self):
        if isinstance(self.options, dict):
            self.options = ForecasterOptions(**self.options)
        for name in ("n_series", "lookback", "horizon"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(self, name)}")
        o = self.options
        if o.patch_len is None or o.patch_stride is None:   # the patch length follows the lookback
            patch = o.patch_len or patch_for(self.lookback)
            o = self.options = dataclasses.replace(o, patch_len=patch, patch_stride=o.patch_stride or patch)
        if o.token == "patch" and o.patch_len > self.lookback:
            raise ValueError(f"--forecaster.patch_len {o.patch_len}: longer than --lookback {self.lookback}")
        inputs = backbone_inputs(o, self.lookback)
        if isinstance(self.backbone, dict):
            self.backbone = MambaConfig.from_dict({**self.backbone, **inputs,
                                                   "bidirectional": o.token == "variate" or
                                                   bool(self.backbone.get("bidirectional"))})
        else:
            inputs["bidirectional"] = o.token == "variate" or self.backbone.bidirectional
            if any(getattr(self.backbone, k) != v for k, v in inputs.items()):
                self.backbone = dataclasses.replace(self.backbone, **inputs)

    @property
    def quantiles(self) -> list[float]:
        return self.options.quantiles

    @property
    def n_outputs(self) -> int:
        return self.options.n_outputs

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ForecasterConfig":
        d = dict(d)
        if "options" not in d:      # the flat layout that models saved before the nesting have
            flat = {k: d.pop(k) for k in list(d) if k not in ("n_series", "lookback", "horizon")}
            d["backbone"] = {k: flat.pop(k) for k in ("d_model", "n_layer", "d_state", "d_conv", "expand", "mixer",
                                                      "residual_in_fp32", "bidirectional") if k in flat}
            if d["backbone"].get("bidirectional") is None:
                d["backbone"].pop("bidirectional", None)
            d["options"] = flat
        return cls(**d)


def patch_for(lookback: int, max_tokens: int = 24) -> int:
    """Patch length (= stride) giving at most `max_tokens` tokens, at least 8 steps per patch."""
    return max(8, math.ceil(lookback / max_tokens))


def backbone_inputs(options: ForecasterOptions, lookback: int) -> dict:
    """The MambaConfig fields that the token scheme sets: one token is a series' lookback or a patch."""
    return {"d_input": lookback if options.token == "variate" else options.patch_len or patch_for(lookback), "vocab_size": None,
            "complement_map": None}


class RevIN(nn.Module):
    """Reversible instance normalisation (Kim et al. 2022): each window is standardised by its own
    per-series mean/std, and forecasts are mapped back, so level shifts between train and test (regime
    changes, ETT's drift) do not have to be learned."""

    def __init__(self, eps: float = 1e-5):
        super().__init__()
        self.eps = eps

    def normalise(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        mean = x.mean(1, keepdim=True).detach()
        std = torch.sqrt(x.var(1, keepdim=True, unbiased=False) + self.eps).detach()
        return (x - mean) / std, (mean, std)

    @staticmethod
    def denormalise(y: torch.Tensor, stats: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        mean, std = stats                                   # (b, 1, C)
        if y.dim() == 4:                                    # (b, H, C, Q)
            mean, std = mean.unsqueeze(-1), std.unsqueeze(-1)
        return y * std + mean


class MambaForecaster(nn.Module):
    def __init__(self, cfg: ForecasterConfig):
        super().__init__()
        self.cfg = cfg
        o, H, Q = cfg.options, cfg.horizon, cfg.n_outputs
        n_tokens = cfg.n_series if o.token == "variate" else self.n_patches
        self.backbone = MambaModel(cfg.backbone)
        self.dropout = nn.Dropout(o.dropout)
        d_model = cfg.backbone.d_model
        head_in = d_model if o.token == "variate" else d_model * n_tokens
        self.head = nn.Linear(head_in, H * Q)
        self.skip = nn.Linear(cfg.lookback, H * Q) if o.linear_skip else None
        self.revin = RevIN() if o.revin else None

    @property
    def n_patches(self) -> int:
        c, o = self.cfg, self.cfg.options
        # PatchTST pads the end with `stride` copies of the last value so the newest step starts a patch.
        return (c.lookback + o.patch_stride - o.patch_len) // o.patch_stride + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (b, L, C) -> (b, H, C) point forecasts, or (b, H, C, Q) quantiles."""
        cfg, o = self.cfg, self.cfg.options
        b, L, C = x.shape
        stats = None
        if self.revin is not None:
            x, stats = self.revin.normalise(x)
        series = x.transpose(1, 2)                                         # (b, C, L)
        if o.token == "variate":
            h = self.backbone(series)                                      # (b, C, d): tokens are series
            y = self.head(self.dropout(h))                                 # (b, C, H*Q)
        else:
            flat = series.reshape(b * C, L)
            flat = torch.cat([flat, flat[:, -1:].expand(-1, o.patch_stride)], dim=1)
            patches = flat.unfold(1, o.patch_len, o.patch_stride)        # (b*C, P, patch_len)
            h = self.backbone(patches)                                     # (b*C, P, d)
            y = self.head(self.dropout(h.flatten(1))).reshape(b, C, -1)
        if self.skip is not None:
            y = y + self.skip(series)
        y = y.reshape(b, C, cfg.horizon, cfg.n_outputs).permute(0, 2, 1, 3)  # (b, H, C, Q)
        if not cfg.quantiles:
            y = y.squeeze(-1)
        if stats is not None:
            y = RevIN.denormalise(y, stats)
        return y


class DLinear(nn.Module):
    """Series decomposition (moving average trend + remainder), a shared linear map lookback -> horizon for
    each part; `individual=False` as in the DLinear paper's main table."""

    def __init__(self, cfg: ForecasterConfig):
        super().__init__()
        self.cfg = cfg
        k = cfg.options.moving_avg
        self.pad_front, self.pad_back = (k - 1) // 2, k // 2
        Q = cfg.n_outputs
        self.trend = nn.Linear(cfg.lookback, cfg.horizon * Q)
        self.seasonal = nn.Linear(cfg.lookback, cfg.horizon * Q)
        # DLinear starts both maps at the mean of the history: a sane forecast before any training.
        for lin in (self.trend, self.seasonal):
            nn.init.constant_(lin.weight, 1.0 / cfg.lookback)
            nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, C = x.shape
        series = x.transpose(1, 2)                                         # (b, C, L)
        padded = torch.cat([series[..., :1].expand(-1, -1, self.pad_front), series,
                            series[..., -1:].expand(-1, -1, self.pad_back)], dim=-1)
        trend = F.avg_pool1d(padded, self.cfg.options.moving_avg, stride=1)
        y = self.trend(trend) + self.seasonal(series - trend)
        y = y.reshape(b, C, self.cfg.horizon, self.cfg.n_outputs).permute(0, 2, 1, 3)
        return y.squeeze(-1) if not self.cfg.quantiles else y


class RLinear(nn.Module):
    """RevIN around one linear map lookback -> horizon, the same for every series (channel-independent)."""

    def __init__(self, cfg: ForecasterConfig):
        super().__init__()
        self.cfg = cfg
        self.revin = RevIN()
        self.linear = nn.Linear(cfg.lookback, cfg.horizon * cfg.n_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, C = x.shape
        xn, stats = self.revin.normalise(x)
        y = self.linear(xn.transpose(1, 2)).reshape(b, C, self.cfg.horizon, self.cfg.n_outputs).permute(0, 2, 1, 3)
        return RevIN.denormalise(y if self.cfg.quantiles else y.squeeze(-1), stats)


MODELS = {"mamba": MambaForecaster, "dlinear": DLinear, "rlinear": RLinear}


def build_model(cfg: ForecasterConfig) -> nn.Module:
    return MODELS[cfg.options.kind](cfg)


def point_forecast(pred: torch.Tensor, quantiles: list[float]) -> torch.Tensor:
    """The median of a quantile forecast (b, H, C, Q), or the forecast itself."""
    return pred[..., quantiles.index(0.5)] if quantiles else pred


def pinball_loss(pred: torch.Tensor, target: torch.Tensor, quantiles: list[float]) -> torch.Tensor:
    """Mean quantile (pinball) loss; pred (..., Q), target (...)."""
    q = torch.tensor(quantiles, dtype=pred.dtype, device=pred.device)
    err = target.unsqueeze(-1) - pred
    return torch.maximum(q * err, (q - 1) * err).mean()


# --- untrained baselines ----------------------------------------------------------------------------
def repeat_last(x: torch.Tensor, horizon: int) -> torch.Tensor:
    """(b, L, C) -> (b, H, C): the last observed value, held."""
    return x[:, -1:].expand(-1, horizon, -1)


def seasonal_naive(x: torch.Tensor, horizon: int, season: int) -> torch.Tensor:
    """(b, L, C) -> (b, H, C): the last full season, repeated. Falls back to repeat-last if L < season."""
    if season > x.shape[1]:
        return repeat_last(x, horizon)
    last = x[:, -season:]
    reps = -(-horizon // season)
    return last.repeat(1, reps, 1)[:, :horizon]
