"""Audio I/O and the log-mel front-end, offline and streaming.

The front-end frames audio without centring (`center=False`): frame i covers samples
[i * hop, i * hop + win). A frame therefore depends only on its own samples, which is what makes the
streaming form exact: `StreamingLogMel` keeps the samples that the next frame still needs (at most
`win - hop` plus what a chunk left over) and emits each frame as soon as its last sample has arrived.
Frames from any chunking equal the offline frames of the whole signal.
"""
from __future__ import annotations

import functools
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torchaudio
from torch import nn
from torch.nn import functional as F

from ssm_core.cli import UserError

LOG_FLOOR = 1e-6          # added to mel power before the log, so silence gives a finite value
MAX_RESAMPLE_RATIO = 16   # refuse sample rates that would need an absurd resampling ratio


@dataclass
class FeatureConfig:
    sample_rate: int = 16000
    win_ms: float = 25.0
    hop_ms: float = 10.0
    n_mels: int = 80

    def __post_init__(self):
        # ValueError, not UserError: a saved model's config.json passes through here too, and its loader
        # reports a damaged file; a command line checks its own flags before building one.
        problems = [f"--{name.replace('_', '-')}: must be >= {low:g}, got {getattr(self, name)}"
                    for name, low in (("sample_rate", 1000), ("n_mels", 1), ("hop_ms", 1e-3), ("win_ms", 1e-3))
                    if not getattr(self, name) >= low]          # `not >=`: NaN fails too
        if not problems and self.win_ms < self.hop_ms:
            problems.append(f"--win-ms {self.win_ms}: shorter than --hop-ms {self.hop_ms}")
        if problems:
            raise ValueError(f"features: {problems[0]} (front-end {asdict(self)})")

    @property
    def win_length(self) -> int:
        return int(round(self.sample_rate * self.win_ms / 1000))

    @property
    def hop_length(self) -> int:
        return int(round(self.sample_rate * self.hop_ms / 1000))

    def num_frames(self, num_samples: int) -> int:
        return 0 if num_samples < self.win_length else 1 + (num_samples - self.win_length) // self.hop_length


class LogMel(nn.Module):
    """Waveform (batch, samples) -> log-mel frames (batch, frames, n_mels)."""

    def __init__(self, cfg: FeatureConfig):
        super().__init__()
        self.cfg = cfg
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=cfg.sample_rate, n_fft=cfg.win_length, win_length=cfg.win_length,
            hop_length=cfg.hop_length, n_mels=cfg.n_mels, center=False, power=2.0)
        # The window and filterbank follow from the config: keep them out of checkpoints.
        for module in self.mel.modules():
            for name, buf in list(module.named_buffers(recurse=False)):
                module.register_buffer(name, buf, persistent=False)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        if wave.shape[-1] < self.cfg.win_length:
            return wave.new_zeros(wave.shape[0], 0, self.cfg.n_mels)
        # The STFT runs in float32 whatever the autocast dtype: log-mel of half-precision power is too coarse.
        with torch.autocast(wave.device.type, enabled=False):
            return torch.log(self.mel(wave.float()) + LOG_FLOOR).transpose(1, 2)


class StreamingLogMel:
    """Carries the overlap between chunks: push(chunk) returns the frames completed by that chunk.

    The frames are computed directly rather than through the offline `LogMel` (torchaudio's STFT module,
    ~10 ops of framing, padding checks and reshapes a call), in 6 ops whatever the chunk: the chunk's frames
    are a strided view of the carried samples, windowed and transformed by one `rfft`, squared as
    interleaved (real, imaginary) pairs, and one matmul with the filterbank (each row repeated for the
    real and the imaginary part, so |X|^2 = re^2 + im^2 is summed inside it; LOG_FLOOR as its bias) gives
    the mel power. The window and filterbank are the offline module's own, laid out once here. Same
    arithmetic as the STFT, so the frames equal the offline ones to float32 rounding."""

    def __init__(self, frontend: LogMel, batch_size: int = 1, device=None):
        self.frontend = frontend
        self.pending = torch.zeros(batch_size, 0, device=device)
        spec, fb = frontend.mel.spectrogram, frontend.mel.mel_scale.fb                 # fb (freqs, n_mels)
        if spec.n_fft != spec.win_length or spec.pad or spec.power != 2.0 or spec.normalized or spec.center:
            raise ValueError("StreamingLogMel: expected the uncentred power spectrogram of LogMel")
        self.window = spec.window
        self.fb_pairs = fb.repeat_interleave(2, dim=0).t().contiguous()               # (n_mels, 2 freqs)
        self.floor = torch.full((fb.shape[1],), LOG_FLOOR, dtype=fb.dtype, device=fb.device)
        # Plain ints and strings: the config's properties recompute them on every access, per chunk.
        cfg = frontend.cfg
        self.win, self.hop, self.n_mels = cfg.win_length, cfg.hop_length, cfg.n_mels
        self.device_type = self.pending.device.type

    def push(self, chunk: torch.Tensor) -> torch.Tensor:
        """chunk (batch, samples) -> frames (batch, new_frames, n_mels); new_frames may be 0."""
        # A copy even when nothing is pending: the caller may reuse its chunk buffer.
        buf = torch.cat([self.pending, chunk.to(self.pending.dtype)], dim=1)
        samples, win, hop = buf.shape[1], self.win, self.hop
        n = 0 if samples < win else 1 + (samples - win) // hop                 # FeatureConfig.num_frames
        # Keep from the first sample of the next frame on: a view of this chunk's buffer, bounded by
        # win + one chunk, and dropped at the next push, so memory stays flat.
        self.pending = buf[:, n * hop:]
        if n == 0:
            return buf.new_zeros(buf.shape[0], 0, self.n_mels)
        if torch.is_autocast_enabled(self.device_type):   # float32 whatever the autocast dtype, as LogMel
            with torch.autocast(self.device_type, enabled=False):
                return self._logmel(buf)
        return self._logmel(buf)

    def _logmel(self, buf: torch.Tensor) -> torch.Tensor:
        frames = buf.unfold(1, self.win, self.hop)                             # (batch, n, win): a view
        pairs = torch.view_as_real(torch.fft.rfft(frames * self.window)).square_().flatten(-2)
        return F.linear(pairs, self.fb_pairs, self.floor).log_()


# --- audio files ------------------------------------------------------------------------------------
def to_mono(wave: np.ndarray) -> np.ndarray:
    """(samples,) or (samples, channels) -> (samples,) float32, channels averaged."""
    wave = np.asarray(wave, dtype=np.float32)
    return wave.mean(axis=1) if wave.ndim == 2 else wave


def resample(wave: torch.Tensor, orig_sr: int, target_sr: int, what: str = "audio") -> torch.Tensor:
    if orig_sr == target_sr:
        return wave
    if orig_sr <= 0 or max(orig_sr, target_sr) / min(orig_sr, target_sr) > MAX_RESAMPLE_RATIO:
        raise UserError(f"{what}: sample rate {orig_sr} Hz cannot be resampled to {target_sr} Hz "
                        f"(ratio beyond {MAX_RESAMPLE_RATIO}x)")
    return _resampler(orig_sr, target_sr)(wave)


@functools.lru_cache(maxsize=8)
def _resampler(orig_sr: int, target_sr: int) -> torchaudio.transforms.Resample:
    # The transform builds its windowed-sinc kernel once; the functional form rebuilds it on every call.
    return torchaudio.transforms.Resample(orig_sr, target_sr)


def check_not_truncated(path: str | Path, what: str) -> None:
    """A WAV file whose data chunk announces more bytes than the file holds was cut short (a copy or a
    recording that stopped): libsndfile reads what is there without a word, so we say it. Other formats
    report damage while decoding."""
    import struct
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(12)
            if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
                return
            offset = 12
            while offset + 8 <= size:
                f.seek(offset)
                chunk_id, chunk_size = struct.unpack("<4sI", f.read(8))
                if chunk_id == b"data":
                    # 0 and 0xFFFFFFFF: writers that stream and never fill in the size
                    if chunk_size not in (0, 0xFFFFFFFF) and offset + 8 + chunk_size > size:
                        raise UserError(f"{what}: the file is truncated (its WAV header announces "
                                        f"{chunk_size} bytes of audio, the file holds {size - offset - 8})")
                    return
                offset += 8 + chunk_size + (chunk_size & 1)
    except OSError:
        return          # unreadable: the decoder that opens it next says so


def load_audio(path: str | Path, sample_rate: int) -> torch.Tensor:
    """Read a WAV/FLAC/OGG file (soundfile), down-mix to mono and resample: -> (samples,) float32.
    Unreadable, empty or unresamplable audio raises UserError naming the file."""
    import soundfile as sf
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such audio file")
    check_not_truncated(path, str(path))
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=False)
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        raise UserError(f"{path}: cannot read audio ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    wave = to_mono(data)
    if wave.size == 0:
        raise UserError(f"{path}: the audio file is empty (0 samples)")
    if not np.isfinite(wave).all():
        raise UserError(f"{path}: the audio contains NaN or infinite samples")
    return resample(torch.from_numpy(np.ascontiguousarray(wave)), int(sr), sample_rate, what=str(path))


def save_audio(path: str | Path, wave: torch.Tensor | np.ndarray, sample_rate: int) -> Path:
    """Write 16-bit PCM WAV atomically."""
    import soundfile as sf

    from ssm_core.io import atomic_path
    data = wave.detach().cpu().numpy() if isinstance(wave, torch.Tensor) else np.asarray(wave)
    with atomic_path(path) as tmp:
        sf.write(str(tmp), np.clip(data, -1.0, 1.0), sample_rate, subtype="PCM_16", format="WAV")
    return Path(path)
