"""The embedded default dataset: Speech-Commands-style clips spoken by espeak-ng, generated offline.

espeak-ng comes as a shared library plus its data in the `espeakng-loader` wheel; we drive the library
through ctypes (synchronous mode: `espeak_Synth` calls our callback with 16-bit samples at 22.05 kHz).
Variety comes from voices (language x voice variant), speaking rates and pitches; each clip is placed at
a random offset in one second, given a random gain, sometimes reverberated with a synthetic room response
and mixed with noise at 0-20 dB SNR. `_background_noise_` holds synthetic noises and non-speech sounds
(tones, chirps, clicks, bursts, babble) from which the `_silence_` class is cut. Test and validation
voices never occur in training.

The folder is written in the Speech Commands layout (`<word>/*.wav`, `validation_list.txt`,
`testing_list.txt`, `_background_noise_/*.wav`) under a cache directory keyed by a hash of the
configuration, built in a temporary folder and renamed into place, built once and reused. Every choice
(words, voices, offsets, gains, noises, SNRs, rooms) comes from a seeded generator, so every build has the
same clips in the same splits. Every engine speaks a word the same whatever it spoke before (audio.engines:
espeak-ng from a fresh, seeded state each word; Pico's memory filled before it reads it; Piper from a fresh
session seeded from the word), so two builds are bit-equal, on any number of CPUs. Words of engines other
than espeak-ng are also kept in a word cache, from which a machine without an engine's package (a GPU host
without the Piper extra) builds the same set. The synthesis itself runs in a process pool on every CPU.

    python -m audio.synth --output-wav demo.wav --seconds 60     # a long test stream with keywords
"""
from __future__ import annotations

import collections
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy.signal import fftconvolve

from ssm_core.cli import UserError, main_entry
from ssm_core.io import write_json_atomic
from ssm_core.validation import cache_folder, finite, in_range, output_file

from .data import KEYWORDS
from .engines import PICO_PITCH, PICO_VOICES, pico_available, piper_available, say, split_voice
from .features import resample, save_audio

OTHER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "bed", "bird",
               "cat", "dog", "happy", "house", "marvin", "sheila", "tree", "wow", "backward", "forward",
               "follow", "learn", "visual"]
# Words that sound close to a keyword without being it (no homophones such as "know" or "write"): spoken
# by the same engines as the keywords, they teach `_unknown_` to mean "another word", so that it does not
# become the answer for "a voice I have not heard".
NEAR_WORDS = ["yet", "note", "cup", "town", "lift", "bright", "own", "often", "shop", "goat"]
SAMPLE_RATE = 16000
CLIP_SAMPLES = SAMPLE_RATE       # one-second clips, as Speech Commands
WORD_END_LIMIT = 0.85            # words end before this time in a clip (the label frames come after it)


ESPEAK_TRAIN_VOICES = [
    "en-us+m1", "en-us+f1", "en+m2", "en+f2", "en-gb-x-rp+m3", "en-gb-x-rp+f3", "en-029+m4",
    "en-gb-scotland+m5", "en-us-nyc+m6", "en+klatt", "en-us+klatt2", "en-gb-x-gbclan+f1",
    # more speakers generalise better to the held-out voices (whose variants and the gbcwmd accent
    # appear nowhere else): espeak's named variants differ in formants, breathiness and intonation
    "en-gb-scotland+f2", "en-us-nyc+f3", "en-029+f1", "en-gb-x-gbclan+m3", "en-us+klatt4", "en-gb-x-rp+klatt",
    "en+Andy", "en-us+Annie", "en-gb-x-rp+david", "en+edward", "en-us+grandma", "en-gb-scotland+john",
    "en-us+linda", "en-029+max", "en-us-nyc+paul", "en+quincy", "en-gb-x-rp+steph", "en-us+travis",
    "en+klatt5", "en-029+klatt6", "en-gb-x-gbclan+klatt4",
    # and more still, Klatt-synthesiser ones among them (the Klatt voice was the hardest test voice)
    "en-us+klatt5", "en-gb-x-rp+klatt6", "en-us-nyc+klatt", "en-gb-scotland+klatt2", "en+croak", "en-us+Gene",
    "en-gb-x-rp+Jacky", "en-us+Mike", "en+Storm", "en-029+boris", "en-us+caleb", "en-gb-x-gbclan+ian",
    "en-us-nyc+norbert", "en+shelby", "en-gb-x-rp+zac", "en-us+aunty", "en+benjamin", "en-gb-scotland+rob"]
# The Piper voice (extra `voices`) with six settings of its sampling noise: about a tenth of the training set.
PIPER_TRAIN_VOICES = [f"piper:joe/{k}" for k in range(6)]
# SVOX Pico's two English voices at three pitches each: as many training voices as Piper's.
PICO_TRAIN_VOICES = [f"pico:{v}/{k}" for v in PICO_VOICES for k in range(len(PICO_PITCH))]
TRAIN_ENGINES = ("espeak", "pico", "piper")


# The version of how words are made, part of the key of a set and of the word cache's folder: 2 speaks every
# espeak-ng word from a fresh, seeded engine state and fills Pico's memory first, 3 seeds Piper's sampling
# noise per word (audio.engines), which makes a build bit-reproducible from nothing but the packages.
SYNTH_VERSION = 3


@dataclass
class SynthConfig:
    words: list[str] = field(default_factory=lambda: KEYWORDS + OTHER_WORDS + NEAR_WORDS)
    train_voices: list[str] = field(default_factory=lambda: ESPEAK_TRAIN_VOICES + PIPER_TRAIN_VOICES)
    val_voices: list[str] = field(default_factory=lambda: ["en-us+m7", "en-gb-x-rp+f4"])
    test_voices: list[str] = field(default_factory=lambda: ["en-gb-x-gbcwmd+m8", "en-us+f5", "en-029+klatt3"])
    rates: list[int] = field(default_factory=lambda: [115, 160, 220])    # words per minute
    pitches: list[int] = field(default_factory=lambda: [20, 50, 80])      # espeak pitch, 0-100
    noise_prob: float = 0.5      # share of clips mixed with noise (at 0-20 dB SNR)
    reverb_prob: float = 0.3
    noise_seconds: float = 60.0  # length of each background-noise file
    seed: int = 0
    # Part of the cache key, so that a set built by older code is not reused (SYNTH_VERSION).
    version: int = SYNTH_VERSION

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]

    def engines(self) -> list[str]:
        return sorted({split_voice(v)[0] for v in self.train_voices + self.val_voices + self.test_voices})

    def utterances(self, voices: list[str]) -> list[tuple[str, str, int, int]]:
        """(word, voice, rate, pitch) of every clip these voices say in the set, in the set's order."""
        return [(w, v, r, p) for v in voices for w in self.words for r in self.rates for p in self.pitches]


def synth_config(size: str, seed: int, engines: list[str] | tuple[str, ...] = ("espeak",)) -> SynthConfig:
    """The embedded dataset: 'full' (45 words, the training voices of `engines`), or 'tiny' for tests and
    smoke runs (the first voice of each engine). Validation and test voices are espeak-ng's held-out ones."""
    unknown = sorted(set(engines) - set(TRAIN_ENGINES))
    if unknown or "espeak" not in engines:
        raise UserError(f"--synth-engines: expected espeak and optionally pico and piper, got {list(engines)}")
    voices = (ESPEAK_TRAIN_VOICES + (PICO_TRAIN_VOICES if "pico" in engines else [])
              + (PIPER_TRAIN_VOICES if "piper" in engines else []))
    if size == "full":
        return SynthConfig(train_voices=voices, seed=seed)
    tiny = (["en-us+m1", "en+f2"] + (PICO_TRAIN_VOICES[:1] if "pico" in engines else [])
            + (PIPER_TRAIN_VOICES[:1] if "piper" in engines else []))
    return SynthConfig(words=KEYWORDS + ["cat"], train_voices=tiny, val_voices=["en-us+m7"],
                       test_voices=["en-us+f5"], rates=[160], pitches=[50], noise_seconds=3.0, seed=seed)


def available_engines(cache_dir: str | Path | None = None) -> list[str]:
    """The training engines this installation can speak with: espeak-ng always, Pico and Piper when their
    packages are installed or their words are in the word cache (a machine without them, given the cache)."""
    words = word_cache_dir(cache_dir)
    installed = {"pico": pico_available, "piper": piper_available}
    return ["espeak"] + [e for e in ("pico", "piper") if installed[e]() or any(words.glob(f"{e}~*/*.flac"))]


# --- words ---------------------------------------------------------------------------------------------
def word_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """Versioned like the sets: words an older version made (unseeded Piper words) are not read."""
    return (Path(cache_dir) if cache_dir else default_cache_dir()) / f"words-v{SYNTH_VERSION}"


def speak(word: str, voice: str, rate: int, pitch: int, cache_dir: str | Path | None = None) -> np.ndarray:
    """A word by any engine's voice (`audio.engines`) at 16 kHz, leading and trailing silence trimmed,
    peak-normalised to 0.5. Words of engines other than espeak-ng are kept in a word cache
    (`<cache>/words/<engine>~<voice>/`, FLAC): the neural voice is slow on a CPU and needs an optional
    extra, and a machine without it (a GPU host) can build the same set from a copy of that folder."""
    import soundfile as sf
    engine, name = split_voice(voice)
    cached = word_cache_dir(cache_dir) / f"{engine}~{name.replace('/', '_')}" / f"{word}_{rate}_{pitch}.flac"
    if engine != "espeak" and cached.is_file():
        return sf.read(str(cached), dtype="float32")[0]
    wave, sr = say(word, voice, rate, pitch)
    wave = resample(torch.from_numpy(np.ascontiguousarray(wave)), sr, SAMPLE_RATE).numpy()
    loud = np.flatnonzero(np.abs(wave) > 0.02 * (np.abs(wave).max() + 1e-9))
    if loud.size:
        wave = wave[loud[0]: loud[-1] + 1]
    wave = (0.5 * wave / (np.abs(wave).max() + 1e-9)).astype(np.float32)
    if engine != "espeak":
        from ssm_core.io import atomic_path
        cached.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(cached) as tmp:
            sf.write(str(tmp), wave, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
        # What a later build reads (16-bit), not the float it came from: the first build equals the next.
        return sf.read(str(cached), dtype="float32")[0]
    return wave


def clip_name(voice: str, rate: int, pitch: int) -> str:
    """The file name of a clip: the voice with its engine (`piper~joe_2_...`; espeak-ng's voices bare, as
    before engines existed), rate and pitch."""
    engine, name = split_voice(voice)
    stem = name.replace("+", "_").replace("/", "_")
    return f"{stem if engine == 'espeak' else engine + '~' + stem}_nohash_{rate}_{pitch}.wav"


def clip_engine(path: str | Path) -> str:
    """The engine that spoke a clip of the embedded set, from its file name (clip_name)."""
    name = Path(path).name
    return name.split("~", 1)[0] if "~" in name else "espeak"


# --- noises, non-speech, rooms --------------------------------------------------------------------------
def colored_noise(rng: np.random.Generator, n: int, exponent: float) -> np.ndarray:
    """1/f^exponent noise (0 white, 1 pink, 2 brown), unit RMS."""
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n)
    f[0] = f[1]
    x = np.fft.irfft(spec / f ** (exponent / 2), n)
    return (x / (x.std() + 1e-9)).astype(np.float32)


def nonspeech(rng: np.random.Generator, n: int) -> np.ndarray:
    """Tones, chirps, clicks and noise bursts at random times: sounds that are not words."""
    t = np.arange(n) / SAMPLE_RATE
    out = np.zeros(n, np.float32)
    pos = 0
    while pos < n:
        length = int(rng.uniform(0.1, 0.8) * SAMPLE_RATE)
        seg = slice(pos, min(n, pos + length))
        tt = t[seg] - t[pos]
        kind = rng.integers(4)
        if kind == 0:
            sig = np.sin(2 * np.pi * rng.uniform(200, 3000) * tt)
        elif kind == 1:
            f0, f1 = rng.uniform(100, 4000, 2)
            sig = np.sin(2 * np.pi * (f0 * tt + (f1 - f0) * tt ** 2 / (2 * max(tt[-1], 1e-3))))
        elif kind == 2:
            sig = np.zeros_like(tt)
            sig[:: max(1, int(SAMPLE_RATE / rng.uniform(2, 30)))] = 1.0
        else:
            sig = rng.standard_normal(tt.size) * np.exp(-tt * rng.uniform(2, 20))
        out[seg] = rng.uniform(0.05, 0.5) * sig
        pos += length + int(rng.uniform(0.0, 0.5) * SAMPLE_RATE)
    return out


def babble(rng: np.random.Generator, n: int, voices: list[str], words: list[str]) -> np.ndarray:
    """Overlapping words of several voices at low level: speech-like noise."""
    out = np.zeros(n, np.float32)
    if not voices:
        return out
    voices = [v for v in voices if split_voice(v)[0] == "espeak"] or voices   # no word-cache misses
    for _ in range(int(n / SAMPLE_RATE * 6)):
        w = speak(str(rng.choice(words)), str(rng.choice(voices)), 175, int(rng.integers(20, 80)))
        start = int(rng.integers(0, max(1, n - w.size)))
        out[start: start + w.size] += w[: n - start]
    return out / (out.std() + 1e-9)


def room_response(rng: np.random.Generator) -> np.ndarray:
    """Exponentially decaying noise with RT60 in 0.15-0.6 s, direct path first."""
    rt60 = rng.uniform(0.15, 0.6)
    n = int(rt60 * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    h = rng.standard_normal(n) * np.exp(-6.9 * t / rt60) * 0.3
    h[0] = 1.0
    return (h / np.sqrt((h ** 2).sum())).astype(np.float32)


def mix_at_snr(speech: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    ps = np.mean(speech ** 2) + 1e-12
    pn = np.mean(noise ** 2) + 1e-12
    return speech + noise * np.sqrt(ps / (pn * 10 ** (snr_db / 10)))


def background_noises(cfg: SynthConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    n = int(cfg.noise_seconds * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    hum = sum(np.sin(2 * np.pi * 50 * k * t) / k for k in range(1, 6)) + 0.1 * colored_noise(rng, n, 0)
    noises = {"white_noise": colored_noise(rng, n, 0.0), "pink_noise": colored_noise(rng, n, 1.0),
              "brown_noise": colored_noise(rng, n, 2.0), "hum": hum.astype(np.float32),
              "nonspeech": nonspeech(rng, n),
              "babble": babble(rng, n, cfg.train_voices or cfg.test_voices, cfg.words)}
    return {k: (0.3 * v / (np.abs(v).max() + 1e-9)).astype(np.float32) for k, v in noises.items()}


def degrade(word: np.ndarray, rng: np.random.Generator, cfg: SynthConfig, noises: list[np.ndarray]) -> np.ndarray:
    """Place a word in a one-second clip with random offset and gain, maybe reverb, maybe noise."""
    if rng.random() < cfg.reverb_prob:
        word = fftconvolve(word, room_response(rng))[: word.size + SAMPLE_RATE // 10].astype(np.float32)
    word = word[: int(WORD_END_LIMIT * SAMPLE_RATE) - 800]
    start = int(rng.integers(800, int(WORD_END_LIMIT * SAMPLE_RATE) - word.size + 1))
    clip = np.zeros(CLIP_SAMPLES, np.float32)
    clip[start: start + word.size] = word * rng.uniform(0.3, 1.5)
    if rng.random() < cfg.noise_prob:
        noise = noises[rng.integers(len(noises))]
        off = int(rng.integers(0, noise.size - CLIP_SAMPLES))
        clip = mix_at_snr(clip, noise[off: off + CLIP_SAMPLES], rng.uniform(0, 20))
    return np.clip(clip, -1, 1).astype(np.float32)


# --- the dataset folder --------------------------------------------------------------------------------
def default_cache_dir() -> Path:
    return Path(os.environ.get("LONG_SSM_CACHE", Path.home() / ".cache" / "long-ssm")) / "audio"


def ensure_dataset(cfg: SynthConfig, cache_dir: str | Path | None = None, progress: bool = True,
                   flag: str = "--synth-cache") -> Path:
    """The folder of the dataset for `cfg`, generated on first use (then reused)."""
    root = cache_folder(cache_dir, flag) if cache_dir else default_cache_dir()
    target = root / f"synth-{cfg.key()}"
    if (target / "synth_config.json").is_file():
        return target
    where = flag if cache_dir else "cache folder (LONG_SSM_CACHE)"
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=root))
    except OSError as e:
        raise UserError(f"{where} {root}: cannot create the synthetic data set there ({e.strerror or e})") from None
    try:
        generate(cfg, tmp, progress, root)
        try:
            os.replace(tmp, target)
        except OSError:          # another process finished the same dataset first: keep theirs
            if not (target / "synth_config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def generate(cfg: SynthConfig, out: Path, progress: bool, cache_dir: Path | None = None) -> None:
    from tqdm import tqdm
    rng = np.random.default_rng(cfg.seed)
    noises = background_noises(cfg, rng)
    (out / "_background_noise_").mkdir()
    for name, wave in noises.items():
        save_audio(out / "_background_noise_" / f"{name}.wav", wave, SAMPLE_RATE)
    noise_list = list(noises.values())
    split_voices = [("train", cfg.train_voices), ("validation", cfg.val_voices), ("testing", cfg.test_voices)]
    lists: dict[str, list[str]] = {"validation": [], "testing": []}
    jobs = [(split, u) for split, vs in split_voices for u in cfg.utterances(vs)]
    waves = speak_all([u for _, u in jobs], cache_dir)
    with _ClipWriter() as writer:
        for (split, (word, voice, rate, pitch)), wave in tqdm(zip(jobs, waves), total=len(jobs), unit="clip",
                                                              desc="synthesising speech commands",
                                                              disable=not progress):
            rel = f"{word}/{clip_name(voice, rate, pitch)}"
            writer.write(out / rel, degrade(wave, rng, cfg, noise_list))
            if split in lists:
                lists[split].append(rel)
    for split, rels in lists.items():
        (out / f"{split}_list.txt").write_text("".join(r + "\n" for r in rels))
    write_json_atomic(out / "synth_config.json", asdict(cfg))


def speak_all(words: list[tuple[str, str, int, int]],
              cache_dir: str | Path | None = None) -> Iterator[np.ndarray]:
    """`speak` of each (word, voice, rate, pitch), in order, spread over the machine's CPUs (_speech_pool);
    words of cached engines land in the word cache as they are made."""
    with _speech_pool(len(words)) as pool:
        yield from pool.map(_speak_job, [(*w, cache_dir) for w in words], chunksize=32)


def _speak_job(args: tuple) -> np.ndarray:
    return speak(*args)


def _one_thread() -> None:
    torch.set_num_threads(1)


class _InProcess:
    """The pool's interface, run in this process (small sets, one CPU)."""
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    @staticmethod
    def map(fn, items, chunksize=1):
        return map(fn, items)


def _speech_pool(n_jobs: int, min_jobs: int = 500, workers: int | None = None):
    """Synthesis is one CPU-bound call per clip (tens of thousands for the full set): spread it over the
    machine's CPUs (or `workers` processes). Only the synthesis runs in workers; the random degradations stay
    in this process, in job order, so the set is the same for any number of workers."""
    if workers is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        workers = min(cpus, 16)
    if workers < 2 or n_jobs < min_jobs:
        return _InProcess()
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    return ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_one_thread)


class _ClipWriter:
    """Writes clips as 16-bit WAV on a few threads. Each write ends in libsndfile's fsync (about 3 ms a clip,
    most of the main process's time per clip); the fsyncs wait on the disk without the GIL, so threads overlap
    them while the main process goes on degrading clips in order (the random draws, so the set, unchanged).
    At most `pending` clips wait at a time (memory stays bounded); a failed write raises here."""

    def __init__(self, threads: int = 8, pending: int = 256):
        from concurrent.futures import ThreadPoolExecutor
        self.pool, self.pending, self.futures = ThreadPoolExecutor(threads), pending, collections.deque()

    def write(self, path: Path, clip: np.ndarray) -> None:
        while len(self.futures) >= self.pending:
            self.futures.popleft().result()
        self.futures.append(self.pool.submit(_write_clip, path, clip))

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        try:
            while self.futures and exc_type is None:     # after an error, only stop: that error is the news
                self.futures.popleft().result()
        finally:
            self.pool.shutdown(cancel_futures=True)
        return False


def _write_clip(path: Path, clip: np.ndarray) -> None:
    import soundfile as sf
    path.parent.mkdir(parents=True, exist_ok=True)
    # Plain writes: the whole folder becomes visible atomically when it is renamed into place.
    sf.write(str(path), clip, SAMPLE_RATE, subtype="PCM_16")


def demo_stream(seconds: float, voices: list[str], words: list[str], seed: int = 0,
                snr_db: float = 20.0) -> tuple[np.ndarray, list[dict]]:
    """A long recording: words every 1.5-3 s over pink noise. Returns (wave, [{word, start, end}])."""
    rng = np.random.default_rng(seed)
    n = int(seconds * SAMPLE_RATE)
    wave = np.zeros(n, np.float32)
    events, pos = [], int(rng.uniform(0.5, 1.5) * SAMPLE_RATE)
    while True:
        word = str(rng.choice(words))
        w = speak(word, str(rng.choice(voices)), int(rng.choice([140, 170])), int(rng.integers(30, 70)))
        if pos + w.size >= n - SAMPLE_RATE // 2:
            break
        wave[pos: pos + w.size] = w * rng.uniform(0.5, 1.2)
        events.append({"word": word, "start": pos / SAMPLE_RATE,
                       "end": (pos + w.size) / SAMPLE_RATE})
        pos += w.size + int(rng.uniform(1.5, 3.0) * SAMPLE_RATE)
    noise = colored_noise(rng, n, 1.0)
    speech_power = np.mean(wave[wave != 0] ** 2) if np.any(wave) else 1e-4
    wave = wave + noise * np.sqrt(speech_power / 10 ** (snr_db / 10))
    return np.clip(wave, -1, 1).astype(np.float32), events


@dataclass
class DemoConfig:
    output_wav: str = field(default="demo.wav", metadata={"help": "the WAV file to write (16 kHz mono)"})
    seconds: float = 60.0
    words: list[str] = field(default_factory=lambda: list(KEYWORDS))
    voices: list[str] = field(default_factory=lambda: SynthConfig().test_voices,
                              metadata={"help": "espeak voices (default: the held-out test voices)"})
    snr_db: float = 20.0
    seed: int = 0

    def __post_init__(self):
        in_range(self.seconds, 1, 36000, "--seconds")
        # Below -40 dB the words vanish in the noise, above 100 dB the noise is below 16-bit resolution.
        in_range(finite(self.snr_db, "--snr-db"), -40, 100, "--snr-db")
        for name in ("words", "voices"):
            if not getattr(self, name):
                raise ValueError(f"--{name}: give at least one")
        if Path(self.output_wav).suffix.lower() == ".json":
            raise ValueError(f"--output-wav {self.output_wav}: the transcript goes beside it as .json; "
                             "give a .wav name")


def main(cfg: DemoConfig) -> None:
    truth = Path(cfg.output_wav).with_suffix(".json")
    output_file(cfg.output_wav, "--output-wav")   # before minutes of synthesis, not after
    wave, events = demo_stream(cfg.seconds, cfg.voices, cfg.words, cfg.seed, cfg.snr_db)
    try:
        save_audio(cfg.output_wav, wave, SAMPLE_RATE)
        write_json_atomic(truth, {"sample_rate": SAMPLE_RATE, "seconds": cfg.seconds, "events": events})
    except OSError as e:
        raise UserError(f"--output-wav {cfg.output_wav}: cannot write ({e.strerror or e})") from None
    print(f"wrote {cfg.output_wav} ({cfg.seconds:.1f} s, {len(events)} words) and its transcript {truth}")


if __name__ == "__main__":
    main_entry(main, DemoConfig, "python -m audio.synth")
