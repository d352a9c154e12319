"""The residual backbone and language model built from mixers (Mamba by default).

    MambaConfig  -> MambaModel: embedding -> n_layer x (RMSNorm -> mixer -> + residual) -> RMSNorm
                 -> MambaLM:    MambaModel + LM head (optionally tied to the embedding)

The residual stream is kept in float32 whatever the compute dtype, or with `residual_in_fp32=False`
(mamba_ssm's option) in the embedding's dtype. Two non-causal variants:
`bidirectional` (a forward and a reversed mixer, summed) and `rc_equivariant` (Caduceus-PS parameter
sharing: half the channels see the sequence, the other half its reverse complement through the same
weights, so the model commutes with reverse-complementing DNA). Neither can stream.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .io import FILE_MODE, atomic_path, write_text_atomic
from .mamba import Mamba
from .ops import rms_norm


@dataclass
class MambaConfig:
    d_model: int = 256
    n_layer: int = 4
    vocab_size: int | None = None      # token input (ids) when set ...
    d_input: int | None = None         # ... else continuous features (batch, L, d_input)
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | str = "auto"
    # The mixer of every layer, or one name per layer (e.g. ["mamba"] * 7 + ["attention"]), or a pattern
    # repeated over the layers, as a list or a comma-separated string ("mamba,mamba,mamba,attention").
    mixer: str | list[str] = "mamba"
    mixer_options: dict[str, Any] = field(default_factory=dict)  # extra keyword arguments for the mixers
    selective: bool = True             # False: time-invariant SSM (the LTI ablation)
    bidirectional: bool = False
    rc_equivariant: bool = False
    complement_map: list[int] | None = None  # token id -> id of its complement (rc_equivariant)
    tie_embeddings: bool = True
    norm_eps: float = 1e-5
    initializer_range: float = 0.02
    rescale_prenorm_residual: bool = True
    gradient_checkpointing: bool = False
    # mamba_ssm's option: True keeps the residual stream in float32 (float64 stays float64) whatever the
    # compute dtype; False keeps it in the dtype the embedding / input projection produces (bf16 for a
    # bf16-cast model: half the stream's memory, at bf16 rounding of every residual add).
    residual_in_fp32: bool = True

    def __post_init__(self):
        if isinstance(self.mixer, str) and "," in self.mixer:
            self.mixer = [m.strip() for m in self.mixer.split(",") if m.strip()]
        if isinstance(self.mixer, tuple):
            self.mixer = list(self.mixer)
        if isinstance(self.mixer, list) and self.mixer and self.n_layer % len(self.mixer) == 0:
            # A shorter list is a pattern repeated over the depth: "mamba,mamba,mamba,attention" on 8 layers.
            self.mixer = self.mixer * (self.n_layer // len(self.mixer))
        if self.vocab_size is None and self.d_input is None:
            raise ValueError("MambaConfig: set vocab_size (token input) or d_input (continuous input)")
        if self.n_layer < 1 or self.d_model < 1:
            raise ValueError("MambaConfig: n_layer and d_model must be >= 1")
        if isinstance(self.mixer, list) and len(self.mixer) != self.n_layer:
            raise ValueError(f"MambaConfig.mixer: got {len(self.mixer)} names for n_layer={self.n_layer} "
                             "(give one per layer, or a pattern whose length divides n_layer)")
        for name in self.layer_mixers():
            if name not in MIXERS:
                raise ValueError(f"MambaConfig.mixer: unknown mixer {name!r}; known: {sorted(MIXERS)}")
        if self.rc_equivariant:
            if self.vocab_size is None or self.complement_map is None:
                raise ValueError("MambaConfig.rc_equivariant needs token input (vocab_size) and complement_map")
            if len(self.complement_map) != self.vocab_size:
                raise ValueError("MambaConfig.complement_map: expected one entry per token of vocab_size")
            if self.d_model % 2:
                raise ValueError("MambaConfig.rc_equivariant: d_model must be even (half per strand)")

    def layer_mixers(self) -> list[str]:
        return list(self.mixer) if isinstance(self.mixer, list) else [self.mixer] * self.n_layer

    @property
    def streamable(self) -> bool:
        return not (self.bidirectional or self.rc_equivariant)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MambaConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"MambaConfig: unknown fields {sorted(unknown)}")
        return cls(**d)


def check_mixer_spec(spec: str, flag: str = "--mixer") -> str:
    """Validate a mixer name or comma-separated pattern from a command line; returns it unchanged."""
    names = [m.strip() for m in str(spec).split(",")]
    for m in names:
        if m not in MIXERS:
            raise ValueError(f"{flag}: unknown mixer {m!r}; known: {', '.join(sorted(MIXERS))}")
    return spec


# --- mixer registry ------------------------------------------------------------------------------------
# name -> factory(config, d_model, layer_idx) -> nn.Module with forward(x), init_state(b, device, dtype) and
# stream(x, state) -> (y, state). Other mixers (Mamba-2, S4D, attention) register themselves here.
MIXERS: dict[str, Callable[[MambaConfig, int, int], nn.Module]] = {}


def register_mixer(name: str):
    def deco(factory):
        MIXERS[name] = factory
        return factory
    return deco


@register_mixer("mamba")
def _mamba_mixer(cfg: MambaConfig, d_model: int, layer_idx: int) -> nn.Module:
    return Mamba(d_model, d_state=cfg.d_state, d_conv=cfg.d_conv, expand=cfg.expand, dt_rank=cfg.dt_rank,
                 selective=cfg.selective, layer_idx=layer_idx, **cfg.mixer_options.get("mamba", {}))


def _acc(x: torch.Tensor) -> torch.Tensor:
    """Accumulation dtype: float32 for half types, else the tensor's own (float64 stays float64)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """Normalised in float32 whatever x's dtype; returned in out_dtype (default x's): the backbone
        normalises its residual stream (float32 by default) straight into the mixers' dtype (one fused kernel on
        CUDA)."""
        return rms_norm(x, self._weight(), self.eps, out_dtype)

    def _weight(self) -> torch.Tensor:
        return self.weight


def _stream_norm(norm: RMSNorm, residual: torch.Tensor) -> torch.Tensor:
    """`norm(residual.to(norm.weight.dtype))` for the streaming path in 5 ops instead of ~8: a streamed
    chunk is a few rows, where per-op dispatch is the cost (~34 -> ~10 us a norm on one CPU thread; `mean`
    and Python-scalar tensor operands are the slow ones, so the mean of squares + eps is one addcmul of the
    rows' 2-norms with a cached 0-dim eps). Same arithmetic as RMSNorm.forward up to float rounding.
    Other norms and dtypes: the module itself."""
    w = norm._parameters["weight"]   # not norm.weight: nn.Module.__getattr__ costs ~1 us
    if type(norm) is not RMSNorm or residual.dtype != w.dtype or residual.dtype not in (torch.float32, torch.float64):
        return norm(residual.to(w.dtype))
    n = torch.linalg.vector_norm(residual, dim=-1, keepdim=True)
    ms = torch.addcmul(_eps_tensor(norm, residual), n, n, value=1.0 / residual.shape[-1])   # mean square + eps
    return torch.mul(residual, ms.rsqrt_()).mul_(w)


def _eps_tensor(norm: RMSNorm, like: torch.Tensor) -> torch.Tensor:
    """norm.eps as a 0-dim tensor of `like`'s dtype and device, kept on the module: a Python float operand
    costs a tensor wrap on every op."""
    cached = norm.__dict__.get("_eps_tensor")
    if cached is None or cached[0] != norm.eps or cached[1].dtype != like.dtype or cached[1].device != like.device:
        with torch.inference_mode(False):
            cached = norm.__dict__["_eps_tensor"] = (norm.eps, torch.tensor(norm.eps, dtype=like.dtype,
                                                                             device=like.device))
    return cached[1]


class RCRMSNorm(RMSNorm):
    """RMSNorm whose per-channel weight is RC-symmetric: the second half is the first, channel-reversed."""
    def __init__(self, d: int, eps: float = 1e-5):
        super().__init__(d // 2, eps)

    def _weight(self) -> torch.Tensor:
        return torch.cat([self.weight, self.weight.flip(0)])


def rc_hidden(h: torch.Tensor) -> torch.Tensor:
    """Reverse complement of a hidden sequence (batch, L, d): reverse time and channels."""
    return h.flip(1).flip(-1)


class Bidirectional(nn.Module):
    """A forward mixer plus a mixer over the reversed sequence, summed (Caduceus' BiMamba, untied)."""
    def __init__(self, fwd: nn.Module, rev: nn.Module):
        super().__init__()
        self.fwd, self.rev = fwd, rev

    def forward(self, x):
        return self.fwd(x) + self.rev(x.flip(1)).flip(1)


class RCEquivariant(nn.Module):
    """Caduceus-PS: channels [0, d/2) go through the mixer, channels [d/2, d) go through the same mixer on
    the reverse complement. Then mixer(RC(x)) == RC(mixer(x)) exactly."""
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        h = x.shape[-1] // 2
        return torch.cat([self.inner(x[..., :h]), rc_hidden(self.inner(rc_hidden(x[..., h:])))], dim=-1)


class Block(nn.Module):
    def __init__(self, cfg: MambaConfig, layer_idx: int):
        super().__init__()
        name = cfg.layer_mixers()[layer_idx]
        d_mix = cfg.d_model // 2 if cfg.rc_equivariant else cfg.d_model
        mixer = MIXERS[name](cfg, d_mix, layer_idx)
        if cfg.bidirectional:
            mixer = Bidirectional(mixer, MIXERS[name](cfg, d_mix, layer_idx))
        if cfg.rc_equivariant:
            mixer = RCEquivariant(mixer)
        self.mixer = mixer
        self.norm = (RCRMSNorm if cfg.rc_equivariant else RMSNorm)(cfg.d_model, cfg.norm_eps)

    def forward(self, residual: torch.Tensor) -> torch.Tensor:
        # The mixer runs in the parameters' (or autocast's) dtype; its output is added to the residual
        # stream in the stream's dtype (float32 with residual_in_fp32). A plain Mamba mixer takes the norm
        # and does all three in one fused call (on CUDA the add rides in its output GEMM).
        if type(self.mixer) is Mamba and type(self.norm) is RMSNorm:
            return self.mixer.residual_forward(residual, self.norm)
        return residual + self.mixer(self.norm(residual, out_dtype=self.norm.weight.dtype))

    def stream(self, residual: torch.Tensor, state):
        # Submodules from _modules: nn.Module.__getattr__ costs ~1 us a lookup, on every chunk and layer.
        norm, mixer = self._modules["norm"], self._modules["mixer"]
        x = _stream_norm(norm, residual)
        if isinstance(mixer, Mamba):   # adds the residual itself, in its output matmul on the CPU
            return mixer.stream(x, state, residual=residual)
        y, state = mixer.stream(x, state)
        return residual + y, state   # promoted as in forward


class MambaModel(nn.Module):
    """Backbone: input (token ids (batch, L) or features (batch, L, d_input)) -> hidden (batch, L, d_model)."""

    def __init__(self, config: MambaConfig):
        super().__init__()
        self.config = cfg = config
        if cfg.vocab_size is not None:
            d_emb = cfg.d_model // 2 if cfg.rc_equivariant else cfg.d_model
            self.embedding = nn.Embedding(cfg.vocab_size, d_emb)
            if cfg.rc_equivariant:
                self.register_buffer("complement", torch.tensor(cfg.complement_map, dtype=torch.long),
                                     persistent=False)
        else:
            self.embedding = nn.Linear(cfg.d_input, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm_f = (RCRMSNorm if cfg.rc_equivariant else RMSNorm)(cfg.d_model, cfg.norm_eps)
        self.apply(self._init_weights)
        if cfg.rescale_prenorm_residual:
            self._rescale_out_proj()

    def _init_weights(self, module: nn.Module) -> None:
        # As mamba_ssm's mixer_seq_simple: zero linear biases (but dt_proj's), N(0, 0.02) embeddings.
        if isinstance(module, nn.Linear) and module.bias is not None and not getattr(module.bias, "_no_reinit", False):
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=self.config.initializer_range)

    def _rescale_out_proj(self) -> None:
        # Output projections scaled by 1/sqrt(n_layer) so the residual stream's variance does not grow
        # with depth (GPT-2 / mamba_ssm "rescale_prenorm_residual").
        for name, module in self.named_modules():
            if name.endswith("out_proj") and isinstance(module, nn.Linear):
                nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5))
                with torch.no_grad():
                    module.weight /= math.sqrt(self.config.n_layer)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if cfg.vocab_size is not None:
            if x.dim() != 2 or x.dtype not in (torch.long, torch.int32, torch.int64, torch.uint8, torch.int16):
                raise ValueError(f"input_ids: expected integer tensor (batch, L), got {x.dtype} {tuple(x.shape)}")
            if cfg.rc_equivariant:
                # [E(t), channel-reversed E(complement(t))]: reverse-complementing the input then equals
                # reversing time and channels of the embedding.
                return torch.cat([self.embedding(x), self.embedding(self.complement[x]).flip(-1)], dim=-1)
            return self.embedding(x)
        if x.dim() != 3 or x.shape[-1] != cfg.d_input or not x.is_floating_point():
            raise ValueError(f"inputs: expected float tensor (batch, L, d_input={cfg.d_input}), got "
                             f"{x.dtype} {tuple(x.shape)}")
        return self.embedding(x)

    def _residual(self, h: torch.Tensor) -> torch.Tensor:
        """The residual stream from the embedding's output. The blocks add their mixers' outputs to it with
        type promotion, so it keeps this dtype unless a mixer returns a wider one (as in mamba_ssm)."""
        return _acc(h) if self.config.residual_in_fp32 else h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] < 1:
            raise ValueError("inputs: sequence length must be >= 1")
        residual = self._residual(self.embed(x))
        for layer in self.layers:
            if self.config.gradient_checkpointing and self.training and torch.is_grad_enabled():
                residual = checkpoint(layer, residual, use_reentrant=False)
            else:
                residual = layer(residual)
        return self.norm_f(residual, out_dtype=self.norm_f.weight.dtype)

    # --- streaming --------------------------------------------------------------------------------------
    def _check_streamable(self) -> None:
        if not self.config.streamable:
            what = "bidirectional" if self.config.bidirectional else "rc_equivariant"
            raise ValueError(f"a {what} model sees the future of the sequence and cannot stream; "
                             "use a causal model (bidirectional=False, rc_equivariant=False)")

    def init_state(self, batch_size: int, device=None, dtype=None) -> list:
        self._check_streamable()
        return [layer.mixer.init_state(batch_size, device=device, dtype=dtype) for layer in self.layers]

    def stream(self, x: torch.Tensor, state: list) -> tuple[torch.Tensor, list]:
        """Consume a chunk (any length >= 1) continuing from `state`; equal to `forward` on the whole stream."""
        return self.stream_embedded(self.embed(x), state)

    def stream_embedded(self, h: torch.Tensor, state: list) -> tuple[torch.Tensor, list]:
        """`stream` from the embedding's output (batch, T, d_model) on: for a caller that computes the
        embedding itself (e.g. with a preceding fixed affine map folded into it)."""
        self._check_streamable()
        residual = self._residual(h)
        for i, layer in enumerate(self._modules["layers"]):   # _modules: see Block.stream
            residual, state[i] = layer.stream(residual, state[i])
        return _stream_norm(self._modules["norm_f"], residual), state


class MambaLM(nn.Module):
    """Language model: MambaModel + a head over the vocabulary (tied to the embedding by default)."""

    def __init__(self, config: MambaConfig):
        super().__init__()
        if config.vocab_size is None:
            raise ValueError("MambaLM: config.vocab_size must be set")
        self.config = config
        self.backbone = MambaModel(config)
        if not config.tie_embeddings:
            d_head = config.d_model // 2 if config.rc_equivariant else config.d_model
            self.lm_head = nn.Linear(d_head, config.vocab_size, bias=False)
            nn.init.normal_(self.lm_head.weight, std=config.initializer_range)

    def head_weight(self) -> torch.Tensor:
        return self.backbone.embedding.weight if self.config.tie_embeddings else self.lm_head.weight

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        W = self.head_weight()
        if self.config.rc_equivariant:
            # logit(t) = <h_fwd, W_t> + <reversed h_rc, W_comp(t)>: RC-equivariant in (position, token).
            half = h.shape[-1] // 2
            return h[..., :half] @ W.t() + h[..., half:].flip(-1) @ W[self.backbone.complement].t()
        return h @ W.t()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.logits(self.backbone(input_ids))

    def init_state(self, batch_size: int, device=None, dtype=None) -> list:
        return self.backbone.init_state(batch_size, device=device, dtype=dtype)

    def stream(self, input_ids: torch.Tensor, state: list) -> tuple[torch.Tensor, list]:
        h, state = self.backbone.stream(input_ids, state)
        return self.logits(h), state


# --- persistence ------------------------------------------------------------------------------------------
def save_pretrained(model: nn.Module, directory: str | os.PathLike, format: str = "long-ssm",
                    weights: str = "pytorch_model.bin") -> Path:
    """Write config.json and model.safetensors into `directory`, each atomically (a reader never sees a
    half-written file). Only those files are replaced: the folder itself is never swapped or removed, so
    other files in it (a user's notes, a package's metadata) stay. The weights go first and the config last:
    a reader between the two renames gets a config that does not fit the weights, which loading refuses
    (strict), never a silently mixed model.
    format="mamba_ssm" writes mamba_ssm's MambaLMHeadModel folder instead (config.json + `weights`,
    pytorch_model.bin or model.safetensors; see ssm_core.interop), with the same rules."""
    from safetensors.torch import save_model

    from . import interop
    if format not in ("long-ssm", "mamba_ssm"):
        raise ValueError(f"save_pretrained: format must be 'long-ssm' or 'mamba_ssm', got {format!r}")
    if format == "mamba_ssm":
        interop.config_to_mamba_ssm(model.config)   # refuse before touching the folder
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if format == "mamba_ssm":
        # interop writes both files into a staging folder on the same file system; each is then renamed
        # into place, weights first.
        staging = Path(tempfile.mkdtemp(prefix=".mamba_ssm.", suffix=".tmp", dir=directory))
        try:
            interop.write_mamba_ssm(model, staging, weights)
            for name in (weights, "config.json"):
                os.chmod(staging / name, FILE_MODE)
                os.replace(staging / name, directory / name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return directory
    with atomic_path(directory / "model.safetensors") as tmp:
        save_model(model, str(tmp))
    meta = {"class": type(model).__name__, "config": model.config.to_dict()}
    write_text_atomic(directory / "config.json", json.dumps(meta, indent=2))
    return directory


def from_pretrained(directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> nn.Module:
    """Load a model written by `save_pretrained` (safetensors: no pickle, nothing executed), or a mamba_ssm
    MambaLMHeadModel folder (config.json + pytorch_model.bin / model.safetensors) as a MambaLM."""
    from safetensors.torch import load_model

    from . import interop
    directory = Path(directory)
    cfg_path = directory / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{directory}: not a saved model (no config.json)")
    try:
        meta = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path}: not valid JSON ({e.msg})") from None
    if isinstance(meta, dict) and interop.is_mamba_ssm_config(meta):
        model = MambaLM(MambaConfig(**interop.config_from_mamba_ssm(meta, str(cfg_path))))
        return interop.load_mamba_ssm(model, directory, map_location)
    cls = {"MambaModel": MambaModel, "MambaLM": MambaLM}.get(meta.get("class"))
    if cls is None:
        raise ValueError(f"{cfg_path}: unknown model class {meta.get('class')!r}")
    model = cls(MambaConfig.from_dict(meta["config"]))
    load_model(model, str(directory / "model.safetensors"), strict=True, device=str(map_location))
    return model


def _load_as(cls):
    def load(directory, map_location="cpu"):
        model = from_pretrained(directory, map_location)
        if not isinstance(model, cls):
            raise ValueError(f"{directory}: holds a {type(model).__name__}, not a {cls.__name__}")
        return model
    return staticmethod(load)


for _cls in (MambaModel, MambaLM):
    _cls.save_pretrained = save_pretrained
    _cls.from_pretrained = _load_as(_cls)
