"""Speech Commands data: any folder in its layout, the torchaudio download, or the embedded synthetic set.

Layout: `<word>/*.wav`, `validation_list.txt` and `testing_list.txt` (paths relative to the root; every
other clip is training), `_background_noise_/*.wav`. Label sets follow the two usual protocols:

* "12": the 10 keywords + `_silence_` (one-second cuts of the background noises) + `_unknown_` (all other
  words, subsampled), each of the two extra classes about 10% of a split (Warden 2018);
* "35": every word folder, no silence or unknown class (the S4 / Audio Mamba benchmark).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ssm_core.cli import UserError

from .engines import word_phones
from .features import load_audio, resample

KEYWORDS = ["yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go"]
SILENCE, UNKNOWN = "_silence_", "_unknown_"
NOISE_DIR = "_background_noise_"
SPLITS = ("train", "validation", "testing")


@dataclass(frozen=True)
class Item:
    path: str            # a word clip, or for _silence_ a background-noise file
    label: int
    offset: int = -1     # >= 0: cut one clip from `path` at this sample (silence)
    gain: float = 1.0


def resolve_root(data: str | Path, flag: str = "--data") -> Path:
    """--data may be the Speech Commands folder itself or the root that torchaudio.datasets.SPEECHCOMMANDS
    downloaded into (<root>/SpeechCommands/speech_commands_v0.02). `flag`: the option that named it, for the
    error messages."""
    root = Path(data)
    if not root.is_dir():
        raise UserError(f"{flag} {root}: no such folder")
    for sub in ("SpeechCommands/speech_commands_v0.02", "SpeechCommands/speech_commands_v0.01",
                "speech_commands_v0.02"):
        if (root / sub / "testing_list.txt").is_file():
            return root / sub
    missing = [f for f in ("validation_list.txt", "testing_list.txt") if not (root / f).is_file()]
    if missing:
        raise UserError(f"{flag} {root}: not in the Speech Commands layout (missing {', '.join(missing)})")
    return root


def word_folders(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))


def label_names(root: Path, label_set: str) -> list[str]:
    if label_set == "12":
        return KEYWORDS + [SILENCE, UNKNOWN]
    if label_set == "35":
        return word_folders(root)
    raise UserError(f"--labels: expected 12 or 35, got {label_set!r}")


def noise_files(root: Path) -> list[Path]:
    return sorted((root / NOISE_DIR).glob("*.wav")) if (root / NOISE_DIR).is_dir() else []


def build_splits(root: Path, labels: list[str], seed: int = 0, clip_samples: int = 16000,
                 extra_fraction: float = 0.1, flag: str = "--data") -> dict[str, list[Item]]:
    """Items of each split; silence and unknown (label set 12) are drawn deterministically from `seed`.
    `flag`: the option that named `root`, for the error messages."""
    import soundfile as sf
    listed = {s: set((root / f"{s}_list.txt").read_text().split()) for s in ("validation", "testing")}
    index = {name: i for i, name in enumerate(labels)}
    known: dict[str, list[Item]] = {s: [] for s in SPLITS}
    unknown: dict[str, list[Item]] = {s: [] for s in SPLITS}
    for word in word_folders(root):
        if word not in index and UNKNOWN not in index:
            continue
        for f in sorted((root / word).glob("*.wav")):
            rel = f"{word}/{f.name}"
            split = "validation" if rel in listed["validation"] else "testing" if rel in listed["testing"] else "train"
            if word in index:
                known[split].append(Item(str(f), index[word]))
            else:
                unknown[split].append(Item(str(f), index[UNKNOWN]))
    if not any(known.values()):
        raise UserError(f"{flag} {root}: no clips of the classes {labels[:5]}... found (<word>/*.wav)")
    rng = np.random.default_rng(seed)
    noises = [(str(p), sf.info(str(p)).frames) for p in noise_files(root)]
    splits = {}
    for s in SPLITS:
        items = list(known[s])
        # Each extra class gets ~extra_fraction of the final split, as in the TensorFlow recipe.
        n_extra = int(round(extra_fraction * len(known[s]) / (1 - 2 * extra_fraction)))
        if UNKNOWN in index and unknown[s]:
            pick = rng.choice(len(unknown[s]), size=min(n_extra, len(unknown[s])), replace=False)
            items += [unknown[s][i] for i in sorted(pick)]
        if SILENCE in index:
            if not noises:
                raise UserError(f"{flag} {root}: label set 12 needs {NOISE_DIR}/*.wav for the _silence_ class")
            for _ in range(n_extra):
                path, frames = noises[rng.integers(len(noises))]
                items.append(Item(path, index[SILENCE], int(rng.integers(0, max(1, frames - clip_samples))),
                                  float(rng.choice([0.0, 0.1, 0.3, 1.0]))))
        splits[s] = items
    return splits


def fit_length(wave: torch.Tensor, n: int) -> torch.Tensor:
    return wave[:n] if wave.numel() >= n else torch.nn.functional.pad(wave, (0, n - wave.numel()))


def clip_word(item: Item) -> str | None:
    """The word a clip speaks (its folder's name); None for a `_silence_` cut of a noise file."""
    return None if item.offset >= 0 else Path(item.path).parent.name


def phone_targets(items: list[Item]) -> tuple[list[str], dict[str, list[int]]]:
    """The phone inventory of the items' words (espeak-ng's, audio.engines.word_phones) and each word's phones
    as ids 1.. (0 is CTC's blank)."""
    phones = {w: word_phones(w) for w in sorted({clip_word(it) for it in items} - {None})}
    inventory = sorted({p for ps in phones.values() for p in ps})
    ids = {p: i + 1 for i, p in enumerate(inventory)}
    return inventory, {w: [ids[p] for p in ps] for w, ps in phones.items()}


class ClipDataset(Dataset):
    """(wave (clip_samples,), label) per item; clips are read lazily (Speech Commands is ~100k files). With
    `phones` (word -> phone ids, phone_targets) also the clip's phone ids, zero-padded to the longest word's,
    and their number (none for `_silence_`)."""

    def __init__(self, items: list[Item], sample_rate: int = 16000, clip_samples: int = 16000,
                 phones: dict[str, list[int]] | None = None):
        self.items, self.sample_rate, self.clip_samples = items, sample_rate, clip_samples
        self.phones = phones
        self.max_phones = max((len(p) for p in phones.values()), default=0) if phones else 0

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        it = self.items[i]
        if it.offset >= 0:
            import soundfile as sf
            data, sr = sf.read(it.path, start=it.offset, frames=self.clip_samples, dtype="float32", always_2d=True)
            if not np.isfinite(data).all():    # load_audio's rule, for the clips cut from a noise file
                raise UserError(f"{it.path}: the audio contains NaN or infinite samples")
            wave = resample(torch.from_numpy(data.mean(axis=1)), sr, self.sample_rate, it.path) * it.gain
        else:
            wave = load_audio(it.path, self.sample_rate)
        if self.phones is None:
            return fit_length(wave, self.clip_samples), it.label
        ids = self.phones[clip_word(it)] if it.offset < 0 else []
        targets = torch.zeros(self.max_phones, dtype=torch.long)
        targets[: len(ids)] = torch.tensor(ids, dtype=torch.long)
        return fit_length(wave, self.clip_samples), it.label, targets, len(ids)


def load_noise_bank(root: Path, sample_rate: int) -> torch.Tensor:
    """All background noises concatenated (samples,), for mixing into training clips; empty if none."""
    waves = [load_audio(p, sample_rate) for p in noise_files(root)]
    return torch.cat(waves) if waves else torch.zeros(0)
