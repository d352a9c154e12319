"""The keyword spotter: log-mel front-end -> fixed normalisation -> causal Mamba encoder -> per-frame logits.

Everything is causal, so the same weights run offline over a whole clip (`forward`) or chunk by chunk on a
live stream (`init_stream` / `stream`), and the streamed per-frame logits equal the offline ones.

Saved as a folder (`save_pretrained` of ssm_core: config.json + model.safetensors, written atomically) or
read back from a Lightning checkpoint of `python -m audio.train`; `load_model` takes either.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from ssm_core import MambaConfig, MambaModel
from ssm_core.cli import UserError
from ssm_core.mamba import params_key
from ssm_core.model import save_pretrained

from .features import FeatureConfig, LogMel, StreamingLogMel

MODEL_CLASS = "KeywordSpotter"


# The encoder fields of KWSConfig before the encoder became one MambaConfig (exported models of then load).
_FLAT_ENCODER_FIELDS = ("d_model", "n_layer", "d_state", "d_conv", "expand", "mixer", "residual_in_fp32")


def default_encoder() -> MambaConfig:
    """The keyword spotter's encoder (about 0.5M parameters with the head); d_input follows the front-end."""
    return MambaConfig(d_model=128, n_layer=4, d_state=16, d_input=FeatureConfig().n_mels)


@dataclass
class KWSConfig:
    labels: list[str]
    features: FeatureConfig = field(default_factory=FeatureConfig)
    # The causal backbone: any mixer that streams (all of ssm_core.MIXERS do); d_input is features.n_mels.
    encoder: MambaConfig = field(default_factory=default_encoder)
    # A clip's class is read from the posteriors of its last `label_frames` frames (after the word).
    label_frames: int = 15

    def __post_init__(self):
        if isinstance(self.features, dict):
            self.features = FeatureConfig(**self.features)
        if isinstance(self.encoder, dict):
            self.encoder = MambaConfig.from_dict({**self.encoder, "d_input": self.features.n_mels})
        if len(self.labels) < 2:
            raise ValueError("KWSConfig.labels: need at least two classes")
        if self.encoder.d_input != self.features.n_mels or self.encoder.vocab_size is not None:
            self.encoder = dataclasses.replace(self.encoder, d_input=self.features.n_mels, vocab_size=None)
        if not self.encoder.streamable:
            raise ValueError("KWSConfig.encoder: must be causal to stream (no bidirectional / rc_equivariant)")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "KWSConfig":
        d = dict(d)
        if "encoder" not in d:     # the flat layout of earlier exports
            d["encoder"] = {k: d.pop(k) for k in _FLAT_ENCODER_FIELDS if k in d}
        return cls(**d)


@dataclass
class StreamState:
    frontend: StreamingLogMel
    encoder: list


class KeywordSpotter(nn.Module):
    def __init__(self, config: KWSConfig):
        super().__init__()
        self.config = config
        self.frontend = LogMel(config.features)
        # Per-mel mean/std of the training features: a fixed affine map, so it streams exactly.
        self.register_buffer("feat_mean", torch.zeros(config.features.n_mels))
        self.register_buffer("feat_std", torch.ones(config.features.n_mels))
        self.encoder = MambaModel(config.encoder)
        self.head = nn.Linear(config.encoder.d_model, len(config.labels))

    @property
    def labels(self) -> list[str]:
        return self.config.labels

    def features(self, wave: torch.Tensor) -> torch.Tensor:
        """wave (batch, samples) -> normalised log-mel (batch, frames, n_mels)."""
        return self.normalize(self.frontend(wave))

    def normalize(self, logmel: torch.Tensor) -> torch.Tensor:
        return (logmel - self.feat_mean) / self.feat_std

    def classify(self, feats: torch.Tensor) -> torch.Tensor:
        """Normalised features (batch, frames, n_mels) -> logits (batch, frames, classes)."""
        return self.head(self.encoder(feats)).float()

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(wave))

    def clip_scores(self, logits: torch.Tensor) -> torch.Tensor:
        """Per-frame logits of one-second clips (batch, frames, classes) -> clip log-posteriors (batch, classes):
        the mean log-posterior over the last `label_frames` frames."""
        return logits[:, -self.config.label_frames:].log_softmax(-1).mean(1)

    # --- streaming --------------------------------------------------------------------------------------
    def init_stream(self, batch_size: int = 1) -> StreamState:
        device = self.feat_mean.device
        return StreamState(StreamingLogMel(self.frontend, batch_size, device=device),
                           self.encoder.init_state(batch_size, device=device))

    def stream(self, chunk: torch.Tensor, state: StreamState) -> torch.Tensor:
        """chunk (batch, samples) -> logits (batch, new_frames, classes) of the frames it completed."""
        frames = state.frontend.push(chunk)
        if frames.shape[1] == 0:
            return frames.new_zeros(frames.shape[0], 0, len(self.labels))
        # Submodules and tensors from the modules' dicts: nn.Module.__getattr__ costs ~1 us a lookup.
        encoder, head = self._modules["encoder"], self._modules["head"]
        embedding = encoder._modules["embedding"]
        if isinstance(embedding, nn.Linear) and frames.dtype == embedding.weight.dtype:
            # The normalisation folded into the encoder's input projection: one op for three a chunk.
            h = F.linear(frames, *self._normalized_embedding(embedding))
            h, state.encoder = encoder.stream_embedded(h, state.encoder)
        else:
            h, state.encoder = encoder.stream(self.normalize(frames), state.encoder)
        return F.linear(h, head._parameters["weight"], head._parameters["bias"]).float()

    def _normalized_embedding(self, emb: nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
        """(W / std, b - (W / std) @ mean): the encoder's input Linear `emb` applied to normalised
        features, as one Linear on the raw log-mel. Cached while the four tensors are unchanged
        (`params_key`)."""
        mean, std = self._buffers["feat_mean"], self._buffers["feat_std"]
        weight, bias = emb._parameters["weight"], emb._parameters["bias"]
        sources = [t for t in (mean, std, weight, bias) if t is not None]
        key = params_key(sources)
        cache = self.__dict__.get("_embedding_cache")
        if key is None or cache is None or cache[0] != key:
            with torch.no_grad(), torch.inference_mode(False):
                w = weight / std
                shift = -(w @ mean) if bias is None else bias - w @ mean
                # The sources are held so that no new tensor can take their addresses while cached.
                cache = (key, (w, shift), [t.detach() for t in sources])
            if key is not None:
                self.__dict__["_embedding_cache"] = cache
        return cache[1]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


# The model that ships in the package (audio.ship writes it), used by audio.stream when --model is not given.
SHIPPED_MODEL = Path(__file__).parent / "pretrained" / "kws"
DETECTOR_FILE = "detector.json"     # beside a model: the operating point its streaming evaluation chose


def shipped_model() -> Path:
    if not (SHIPPED_MODEL / "config.json").is_file():
        raise UserError(f"no shipped model in this installation ({SHIPPED_MODEL} is missing); "
                        "give --model (a folder made by audio.train)")
    return SHIPPED_MODEL


def detector_settings(path: str | Path) -> dict:
    """The operating point saved beside a model folder (threshold, smooth_ms, refractory_ms), or {}."""
    f = Path(path) / DETECTOR_FILE
    if not f.is_file():
        return {}
    try:
        settings = json.loads(f.read_text())
    except json.JSONDecodeError:
        raise UserError(f"--model {f}: not valid JSON") from None
    return {k: float(settings[k]) for k in ("threshold", "smooth_ms", "refractory_ms") if k in settings}


def export_model(model: KeywordSpotter, directory: str | Path) -> Path:
    return save_pretrained(model, directory)


def _build(config: dict, state_dict: dict, source: str) -> KeywordSpotter:
    try:
        model = KeywordSpotter(KWSConfig.from_dict(config))
        model.load_state_dict(state_dict, strict=True)
    except (TypeError, ValueError, RuntimeError, KeyError) as e:
        raise UserError(f"{source}: not a valid audio keyword-spotting model ({str(e).splitlines()[0]})") from None
    return model.eval()


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> KeywordSpotter:
    """Load a keyword spotter from an exported folder (config.json + model.safetensors), a training output
    folder (uses its model/), or a Lightning checkpoint of `audio.train`. Anything else: UserError."""
    path = Path(path)
    if path.is_dir() and not (path / "config.json").is_file() and (path / "model" / "config.json").is_file():
        path = path / "model"
    if path.is_dir():
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise UserError(f"--model {path}: not a saved model (no config.json)")
        try:
            meta = json.loads(cfg_file.read_text())
        except json.JSONDecodeError:
            raise UserError(f"--model {cfg_file}: not valid JSON") from None
        if not isinstance(meta, dict) or meta.get("class") != MODEL_CLASS:
            kind = meta.get("class") if isinstance(meta, dict) else type(meta).__name__
            raise UserError(f"--model {path}: holds a {kind!r} model, not an audio keyword spotter")
        from safetensors.torch import load_file
        try:
            sd = load_file(str(path / "model.safetensors"), device=str(map_location))
        except Exception as e:  # noqa: BLE001 (safetensors raises its own error types for corrupt files)
            raise UserError(f"--model {path}: cannot read model.safetensors ({str(e).splitlines()[0]})") from None
        return _build(meta["config"], sd, f"--model {path}")
    if not path.is_file():
        raise UserError(f"--model {path}: no such file or folder")
    return checkpoint_model(read_checkpoint(path, f"--model {path}", map_location), f"--model {path}")


def read_checkpoint(path: str | Path, source: str, map_location: str | torch.device = "cpu") -> dict:
    """A torch checkpoint file's contents (tensors and plain types only); a file that is none: UserError."""
    try:
        return torch.load(str(path), map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 (pickle, zip, EOF... errors of a file that is no torch checkpoint)
        raise UserError(f"{source}: not a readable checkpoint ({type(e).__name__})") from None


def checkpoint_model(ckpt: dict, source: str, weights: str = "state_dict") -> KeywordSpotter:
    """The keyword spotter of a loaded `audio.train` checkpoint, with its `weights` entry: "state_dict" (with
    --ema-decay the average), or "current_model_state" (the raw weights beside the average)."""
    hp = ckpt.get("hyper_parameters", {}) if isinstance(ckpt, dict) else {}
    if not isinstance(hp, dict) or "kws" not in hp or weights not in ckpt:
        raise UserError(f"{source}: not an audio keyword-spotting checkpoint (made by audio.train)")
    prefix = "model."
    sd = {k[len(prefix):]: v for k, v in ckpt[weights].items() if k.startswith(prefix)}
    return _build(hp["kws"], sd, source)
