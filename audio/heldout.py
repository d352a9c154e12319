"""A test set spoken by an engine the model never trains on, in the Speech Commands layout (every clip in
`testing_list.txt`), for `audio.evaluate --data DIR` and `audio.train --heldout DIR`.

    python -m audio.heldout --output-dir .heldout/flite            # Flite's voices (apt-get install flite)

Flite is not installable from the Python registry, so it can never be in the training set: it is the
engine held out whole. Clips are made as the embedded set's (`audio.synth.degrade`: offset, gain, reverb
sometimes, noise at 0-20 dB SNR half the time), from the keywords and the near and other words of the
`_unknown_` class, and the folder carries its own background noises (babble of the same engine) for the
`_silence_` class. Built in a temporary folder beside the output and renamed into place; an existing
non-empty folder is refused.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ssm_core.cli import UserError, main_entry
from ssm_core.io import atomic_folder
from ssm_core.validation import writable_folder

from .data import KEYWORDS
from .engines import FLITE_VOICES
from .synth import NEAR_WORDS, OTHER_WORDS, SynthConfig, generate


@dataclass
class HeldoutConfig:
    output_dir: str = field(default=".heldout/flite", metadata={"help": "new or empty folder to write"})
    voices: list[str] = field(default_factory=lambda: [f"flite:{v}" for v in FLITE_VOICES if v != "kal"],
                              metadata={"help": "engine:voice names (kal is kal16 at 8 kHz: left out)"})
    words: list[str] = field(default_factory=lambda: KEYWORDS + NEAR_WORDS[::2] + OTHER_WORDS[10:13],
                             metadata={"help": "keywords and the words of the _unknown_ class"})
    rates: list[int] = field(default_factory=lambda: [130, 165, 200])
    pitches: list[int] = field(default_factory=lambda: [35, 65])
    noise_seconds: float = 10.0
    seed: int = 1

    def __post_init__(self):
        for name in ("voices", "words", "rates", "pitches"):
            if not getattr(self, name):
                raise ValueError(f"--{name}: give at least one")


def build_heldout(cfg: HeldoutConfig, progress: bool = True) -> Path:
    out = writable_folder(cfg.output_dir, "--output-dir")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--output-dir {out}: exists and is not empty (give a new folder)")
    synth = SynthConfig(words=cfg.words, train_voices=[], val_voices=[], test_voices=cfg.voices, rates=cfg.rates,
                        pitches=cfg.pitches, noise_seconds=cfg.noise_seconds, seed=cfg.seed)
    with atomic_folder(out) as tmp:          # an existing `out` is empty (checked above)
        generate(synth, tmp, progress)
    return out


def main(cfg: HeldoutConfig) -> Path:
    out = build_heldout(cfg)
    clips = len((out / "testing_list.txt").read_text().split())
    print(f"audio.heldout: {clips} clips of {len(cfg.voices)} voices in {out}")
    return out


if __name__ == "__main__":
    main_entry(main, HeldoutConfig, "python -m audio.heldout")
