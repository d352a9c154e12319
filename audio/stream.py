"""Streaming keyword spotting from a WAV/FLAC file or a live microphone.

    python -m audio.stream --model runs/kws/model --wav demo.wav             # as fast as possible
    python -m audio.stream --model runs/kws/model --wav demo.wav --realtime  # paced like a live input
    python -m audio.stream --model runs/kws/model --mic --jsonl              # needs `pip install .[mic]`

Audio arrives in chunks (`--chunk-ms`, 10 ms to 1 s); each chunk goes through the streaming log-mel
front-end and the causal Mamba encoder, which carry their state (the frame overlap, the conv tails and
the SSM states), so the per-frame posteriors equal an offline pass over the whole recording. Posteriors are
smoothed over `--smooth-ms`; a keyword is detected while its smoothed posterior is at or above
`--threshold`, and reported when it falls below again (start/end: when it crossed the threshold; score: its
peak). Nothing grows with the length of the stream: memory is flat for hours of input. At the end a
summary: audio seconds, real-time factor (compute time / audio time) and per-chunk latency p50/p99.

A file with NaN or infinite samples is refused at the first such chunk (there is no sound to repair them
from); `--seconds` must be a positive duration.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ssm_core.cli import UserError, main_entry
from ssm_core.validation import at_least, distinct_paths, in_range, output_file, positive_finite

from .data import SILENCE, UNKNOWN
from .features import check_not_truncated, load_audio, to_mono
from .model import KeywordSpotter, detector_settings, load_model, shipped_model


@dataclass
class StreamConfig:
    model: str = field(default="", metadata={
        "help": "model folder or checkpoint made by audio.train (default: the model shipped in the package)"})
    wav: str | None = field(default=None, metadata={"help": "audio file to stream (WAV/FLAC/OGG)"})
    mic: bool = field(default=False, metadata={"help": "stream from the default (or --input-device) microphone"})
    realtime: bool = field(default=False, metadata={"help": "--wav: pace the file as if it were live"})
    chunk_ms: float = field(default=20.0, metadata={"help": "chunk length, 10 to 1000 ms"})
    threshold: float | None = field(default=None, metadata={
        "help": "smoothed posterior a keyword must reach (default: the model's operating point, else 0.6)"})
    smooth_ms: float | None = field(default=None, metadata={
        "help": "moving average of the posteriors (default: the model's, else 150)"})
    refractory_ms: float | None = field(default=None, metadata={
        "help": "no new detection this long after one starts (default: the model's, else 0)"})
    keywords: list[str] | None = field(default=None, metadata={
        "help": "classes to report (default: every class but _silence_ and _unknown_)"})
    jsonl: bool = field(default=False, metadata={"help": "print detections and the summary as JSON lines"})
    seconds: float | None = field(default=None, metadata={"help": "stop after this much audio"})
    input_device: str | None = field(default=None, metadata={"help": "--mic: input device name or index"})
    threads: int = field(default=1, metadata={"help": "torch CPU threads"})
    dump_posteriors: str | None = field(default=None, metadata={
        "help": "write every frame's posteriors to this .npy at the end (keeps them all in memory)"})

    def __post_init__(self):
        if self.mic == (self.wav is not None):
            raise ValueError("give exactly one input: --wav FILE or --mic")
        in_range(self.chunk_ms, 10, 1000, "--chunk-ms")
        if self.threshold is not None and not 0 < positive_finite(self.threshold, "--threshold") <= 1:
            raise ValueError(f"--threshold: expected a posterior in (0, 1], got {self.threshold}")
        for name in ("smooth_ms", "refractory_ms"):
            if getattr(self, name) is not None:
                at_least(getattr(self, name), 0, f"--{name.replace('_', '-')}")
        at_least(self.threads, 1, "--threads")
        if self.seconds is not None:
            positive_finite(self.seconds, "--seconds")


# --- pieces ---------------------------------------------------------------------------------------------
@dataclass
class Detection:
    keyword: str
    start: float     # seconds from the start of the stream
    end: float
    score: float


class Detector:
    """Moving-average smoothing of per-frame posteriors, then rise/fall events against one threshold or
    several at once (an array: the streaming evaluation sweeps them over one pass).

    A keyword becomes active when its smoothed posterior is the highest of the keywords and reaches the
    threshold, and is reported when it falls below again (start/end: the crossings, score: the peak). A
    refractory time after each start blocks new starts, so one spoken word that wobbles around the
    threshold is one detection. Everything is a fixed-size array: memory is flat over any stream."""

    def __init__(self, labels: list[str], keywords: list[str], frame_end: Callable[[int], float],
                 smooth_frames: int, threshold: float | np.ndarray, refractory_frames: int = 0):
        unknown = [k for k in keywords if k not in labels]
        if unknown:
            raise UserError(f"--keywords: {unknown} are not classes of the model ({labels})")
        self.cols = np.array([labels.index(k) for k in keywords])
        self.names = keywords
        self.frame_end = frame_end
        self.thresholds = np.atleast_1d(np.asarray(threshold, np.float64))
        self.lowest = float(self.thresholds.min())
        self.refractory = int(refractory_frames)
        self.window = np.zeros((max(1, smooth_frames), len(labels)), np.float64)  # ring buffer
        self.total = np.zeros(len(labels))
        self.frame = 0
        k = self.thresholds.size
        self.active = np.full(k, -1)                   # keyword column per threshold, -1: none
        self.start, self.end, self.peak = np.zeros(k), np.zeros(k), np.zeros(k)
        self.blocked_until = np.zeros(k, np.int64)     # first frame at which a new start is allowed

    @property
    def threshold(self) -> float:
        return float(self.thresholds[0])

    def update_all(self, posteriors: np.ndarray) -> list[tuple[int, Detection]]:
        """(threshold index, finished detection) for every detection the frames completed."""
        out = []
        w = self.window.shape[0]
        thr = self.thresholds
        for p in posteriors:
            slot = self.frame % w
            self.total += p - self.window[slot]
            self.window[slot] = p
            smoothed = self.total[self.cols] / min(self.frame + 1, w)
            best = int(smoothed.argmax())
            on = self.active >= 0
            if not on.any() and smoothed[best] < self.lowest:   # the common frame: nothing to do
                self.frame += 1
                continue
            t = self.frame_end(self.frame)
            if on.any():
                level = smoothed[np.maximum(self.active, 0)]
                still = on & (level >= thr)
                self.end[still] = t
                self.peak[still] = np.maximum(self.peak[still], level[still])
                for i in np.flatnonzero(on & ~still):
                    out.append((int(i), Detection(self.names[self.active[i]], float(self.start[i]),
                                                  float(self.end[i]), float(self.peak[i]))))
                self.active[on & ~still] = -1
            rise = (self.active < 0) & (smoothed[best] >= thr) & (self.frame >= self.blocked_until)
            if rise.any():
                self.active[rise], self.start[rise], self.end[rise] = best, t, t
                self.peak[rise] = smoothed[best]
                self.blocked_until[rise] = self.frame + self.refractory
            self.frame += 1
        return out

    def update(self, posteriors: np.ndarray) -> list[Detection]:
        return [d for _, d in self.update_all(posteriors)]

    def flush_all(self) -> list[tuple[int, Detection]]:
        done = [(int(i), Detection(self.names[self.active[i]], float(self.start[i]), float(self.end[i]),
                                   float(self.peak[i]))) for i in np.flatnonzero(self.active >= 0)]
        self.active[:] = -1
        return done

    def flush(self) -> list[Detection]:
        return [d for _, d in self.flush_all()]


def model_detector(model: KeywordSpotter, keywords: list[str], threshold: float | np.ndarray, smooth_ms: float,
                   refractory_ms: float) -> Detector:
    """A Detector on `model`'s frames: each frame's end time and the smoothing / refractory times in frames."""
    f = model.config.features
    return Detector(model.labels, keywords, lambda i: (i * f.hop_length + f.win_length) / f.sample_rate,
                    int(round(smooth_ms / f.hop_ms)), threshold, int(round(refractory_ms / f.hop_ms)))


class LatencyHistogram:
    """Log-spaced histogram of latencies (1 us to 100 s, 1% bins): quantiles in constant memory."""

    def __init__(self, lo: float = 1e-6, hi: float = 100.0, ratio: float = 1.01):
        self.lo, self.log_ratio = lo, math.log(ratio)
        self.counts = np.zeros(int(math.log(hi / lo) / self.log_ratio) + 2, np.int64)
        self.n, self.sum = 0, 0.0

    def add(self, seconds: float) -> None:
        i = int(math.log(max(seconds, self.lo) / self.lo) / self.log_ratio)
        self.counts[min(i, self.counts.size - 1)] += 1
        self.n += 1
        self.sum += seconds

    def quantile(self, q: float) -> float:
        if self.n == 0:
            return float("nan")
        i = int(np.searchsorted(np.cumsum(self.counts), q * self.n, side="left"))
        return self.lo * math.exp((i + 0.5) * self.log_ratio)   # bin centre


@dataclass
class Summary:
    audio_seconds: float
    compute_seconds: float
    chunks: int
    chunk_ms: float
    latency_p50_ms: float | None    # None when no chunk was processed (not NaN: the JSON line stays JSON)
    latency_p99_ms: float | None
    detections: int

    @property
    def rtf(self) -> float:
        return self.compute_seconds / max(self.audio_seconds, 1e-9)

    def line(self) -> str:
        if self.latency_p50_ms is None or self.latency_p99_ms is None:
            latency = "no chunks processed"
        else:
            latency = (f"chunk latency p50 {self.latency_p50_ms:.2f} ms p99 {self.latency_p99_ms:.2f} ms "
                       f"({self.chunks} chunks of {self.chunk_ms:g} ms)")
        return (f"summary: audio {self.audio_seconds:.2f} s, real-time factor {self.rtf:.4f}, {latency}, "
                f"{self.detections} detections")


# --- audio sources --------------------------------------------------------------------------------------
def file_chunks(path: str, sample_rate: int, chunk: int, realtime: bool = False) -> Iterator[np.ndarray]:
    """Chunks of a file at the model's rate. Files already at that rate are read block by block (flat
    memory for any length); others are decoded, down-mixed and resampled whole first."""
    import soundfile as sf
    if not os.path.exists(path):
        raise UserError(f"--wav {path}: no such file")
    if os.path.isdir(path):
        raise UserError(f"--wav {path}: is a folder, not an audio file")
    try:
        info = sf.info(path)
    except (sf.LibsndfileError, RuntimeError) as e:
        raise UserError(f"--wav {path}: cannot read audio ({str(e).splitlines()[0]})") from None
    if info.frames == 0:
        raise UserError(f"--wav {path}: the audio file is empty (0 samples)")
    check_not_truncated(path, f"--wav {path}")
    changes = ([f"down-mixed from {info.channels} channels to mono"] if info.channels > 1 else []) + \
        ([f"resampled from {info.samplerate} Hz to {sample_rate} Hz"] if info.samplerate != sample_rate else [])
    if changes:
        print(f"audio.stream: note: --wav {path}: {' and '.join(changes)}", file=sys.stderr)
    if info.samplerate == sample_rate:
        blocks = (to_mono(b) for b in sf.blocks(path, blocksize=chunk, dtype="float32", always_2d=True))
    else:
        wave = load_audio(path, sample_rate).numpy()
        blocks = (wave[i: i + chunk] for i in range(0, wave.size, chunk))
    start, sent = time.perf_counter(), 0
    for block in blocks:
        if not np.isfinite(block).all():
            bad = sent + int(np.flatnonzero(~np.isfinite(block))[0])
            raise UserError(f"--wav {path}: sample {bad} ({bad / sample_rate:.3f} s) is {block[bad - sent]}; the "
                            "file holds non-finite audio (a damaged float WAV?)")
        if realtime:   # a live source delivers a chunk only once its last sample has been "recorded"
            delay = start + (sent + block.size) / sample_rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        sent += block.size
        yield block


def open_sounddevice_stream(**kwargs):
    """A sounddevice.InputStream, or one clear UserError for each way the microphone can be missing."""
    try:
        import sounddevice as sd
    except ImportError:
        raise UserError("--mic needs the sounddevice package: pip install 'long-ssm[mic]' "
                        "(or pip install sounddevice)") from None
    except OSError as e:
        raise UserError(f"--mic: the PortAudio library is missing ({e}); on Debian/Ubuntu: "
                        "apt-get install libportaudio2") from None
    try:
        sd.check_input_settings(device=kwargs.get("device"), channels=kwargs.get("channels", 1),
                                samplerate=kwargs.get("samplerate"), dtype=kwargs.get("dtype"))
        return sd.InputStream(**kwargs)
    except (sd.PortAudioError, ValueError) as e:
        raise UserError(f"--mic: no usable input device ({str(e).splitlines()[0] or type(e).__name__})") from None


def mic_chunks(sample_rate: int, chunk: int, device: str | None = None,
               open_stream: Callable[..., Any] = open_sounddevice_stream) -> Iterator[np.ndarray]:
    """Chunks from a microphone. `open_stream(**kwargs)` returns a context manager with
    `read(frames) -> (array (frames, channels), overflowed)`, as sounddevice.InputStream (tests inject one)."""
    dev: str | int | None = int(device) if device is not None and device.isdigit() else device
    stream = open_stream(samplerate=sample_rate, channels=1, blocksize=chunk, dtype="float32", device=dev)
    with stream:
        while True:
            data, overflowed = stream.read(chunk)
            if overflowed:
                print("audio.stream: warning: input overflow, samples were dropped", file=sys.stderr)
            if len(data) == 0:
                return
            yield to_mono(data)


def take_seconds(chunks: Iterable[np.ndarray], samples: int | None) -> Iterator[np.ndarray]:
    sent = 0
    for c in chunks:
        if samples is not None and sent + c.size >= samples:
            if samples - sent > 0:
                yield c[: samples - sent]
            return
        sent += c.size
        yield c


# --- the loop -------------------------------------------------------------------------------------------
@torch.inference_mode()
def run_stream(model: KeywordSpotter, chunks: Iterable[np.ndarray], detector: Detector, chunk_ms: float,
               on_detection: Callable[[Detection], None] = lambda d: None,
               keep_posteriors: bool = False) -> tuple[Summary, np.ndarray | None]:
    """Push every chunk through the model; returns the summary (and all posteriors if asked)."""
    state = model.init_stream(1)
    hist, samples, n_det, kept = LatencyHistogram(), 0, 0, []
    try:
        for chunk in chunks:
            t0 = time.perf_counter()
            post = model.stream(torch.from_numpy(np.ascontiguousarray(chunk, np.float32))[None], state)
            post = post.softmax(-1)[0].numpy()
            found = detector.update(post)
            hist.add(time.perf_counter() - t0)
            samples += chunk.size
            if keep_posteriors:
                kept.append(post)
            for d in found:
                n_det += 1
                on_detection(d)
    except KeyboardInterrupt:   # Ctrl-C ends a live session; the summary still comes
        pass
    for d in detector.flush():
        n_det += 1
        on_detection(d)
    sr = model.config.features.sample_rate
    p50, p99 = (1e3 * hist.quantile(q) if hist.n else None for q in (0.5, 0.99))
    summary = Summary(samples / sr, hist.sum, hist.n, chunk_ms, p50, p99, n_det)
    return summary, (np.concatenate(kept) if keep_posteriors and kept else None)


def main(cfg: StreamConfig, open_stream: Callable[..., Any] | None = None) -> Summary:
    if cfg.dump_posteriors:
        if cfg.wav:
            distinct_paths(cfg.wav, cfg.dump_posteriors, ("--wav", "--dump-posteriors"))
        output_file(cfg.dump_posteriors, "--dump-posteriors")
    torch.set_num_threads(cfg.threads)
    path = cfg.model or shipped_model()
    model = load_model(path)
    saved = detector_settings(path) if Path(path).is_dir() else {}
    threshold = cfg.threshold if cfg.threshold is not None else saved.get("threshold", 0.6)
    smooth_ms = cfg.smooth_ms if cfg.smooth_ms is not None else saved.get("smooth_ms", 150.0)
    refractory_ms = cfg.refractory_ms if cfg.refractory_ms is not None else saved.get("refractory_ms", 0.0)
    feats = model.config.features
    sr, chunk = feats.sample_rate, max(1, int(round(cfg.chunk_ms * feats.sample_rate / 1000)))
    keywords = cfg.keywords or [c for c in model.labels if c not in (SILENCE, UNKNOWN)]
    detector = model_detector(model, keywords, threshold, smooth_ms, refractory_ms)
    if cfg.mic:
        source = mic_chunks(sr, chunk, cfg.input_device, open_stream or open_sounddevice_stream)
    else:
        source = file_chunks(cfg.wav, sr, chunk, cfg.realtime)
    limit = int(cfg.seconds * sr) if cfg.seconds else None

    def emit(d: Detection) -> None:
        if cfg.jsonl:
            print(json.dumps({"type": "detection", **asdict(d)}), flush=True)
        else:
            print(f"{d.start:9.2f}s - {d.end:7.2f}s  {d.keyword:<10s} score {d.score:.3f}", flush=True)

    summary, posteriors = run_stream(model, take_seconds(source, limit), detector, cfg.chunk_ms, emit,
                                     keep_posteriors=cfg.dump_posteriors is not None)
    if cfg.dump_posteriors and posteriors is not None:
        from ssm_core.io import atomic_path
        try:
            with atomic_path(cfg.dump_posteriors) as tmp, open(tmp, "wb") as f:
                np.save(f, posteriors)
        except OSError as e:
            raise UserError(f"--dump-posteriors {cfg.dump_posteriors}: cannot write ({e.strerror or e})") from None
    if cfg.jsonl:
        print(json.dumps({"type": "summary", **asdict(summary), "rtf": summary.rtf}), flush=True)
    else:
        print(summary.line(), flush=True)
    if not cfg.model and cfg.threshold is None and "threshold" in saved:
        # A first run with the shipped model should not read as "it hears nothing": its saved threshold is an
        # operating point for few false alarms, and the user should know it is a dial (after the run, so an
        # input error stays the one line on stderr).
        print(f"audio.stream: note: threshold {threshold:g} is the shipped model's operating point, chosen for "
              f"few false alarms: it misses many keywords in speech unlike its training (see {path}/MODEL_CARD.md); "
              "a lower --threshold detects more, with more false alarms", file=sys.stderr)
    return summary


if __name__ == "__main__":
    main_entry(main, StreamConfig, "python -m audio.stream")
