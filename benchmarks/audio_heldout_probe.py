"""Why a keyword spotter misses on speech it never heard: its accuracy on a held-out folder (another synthesis
engine from `python -m audio.heldout`, or any Speech Commands layout) when the clips are changed at test time
in the ways the training augmentations vary speech.

    python benchmarks/audio_heldout_probe.py --heldout .heldout/flite                 # the shipped model
    python benchmarks/audio_heldout_probe.py --model runs/kws/model --heldout DIR --out probe.json

Each row is one transform of every clip, the model unchanged:
  * stretch: resampled to play slower (> 1: lower and longer) or faster, cut back to the clip (the training's
    speed perturbation covers 0.9-1.1);
  * warp: the mel axis stretched, formants moved up (> 1) or down, as a shorter or longer vocal tract (the
    training's mel warp covers 0.85-1.15);
  * cepstra: the normalised log-mel smoothed along the mel axis to its first N cepstra (an orthonormal DCT
    truncated and inverted): the fine structure, the harmonics of the voice's pitch, removed;
  * unknown bias: the `_unknown_` class's clip score lowered by d (a prior shift, trading misses for false
    alarms).
A transform that raises the accuracy names a mismatch between the held-out speech and the training that the
augmentation could close (or its range widen); accuracy that only falls says the gap lies elsewhere. A
diagnosis, not a tuning: no transform here is applied by the product.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from audio.augment import stretch, warp_mel_axis
from audio.data import ClipDataset, build_splits, resolve_root
from audio.model import KeywordSpotter, load_model, shipped_model
from ssm_core.cli import UserError, main_entry
from ssm_core.io import write_json_atomic


@dataclass
class ProbeConfig:
    heldout: str = field(default=".heldout/flite", metadata={
        "help": "Speech Commands folder of the speech to probe (its testing split, or the whole of an "
                "audio.heldout folder)"})
    model: str | None = field(default=None, metadata={"help": "model folder; default: the shipped model"})
    stretches: list[float] = field(default_factory=lambda: [0.8, 0.9, 1.1, 1.2])
    warps: list[float] = field(default_factory=lambda: [0.8, 0.9, 1.1, 1.2])
    cepstra: list[int] = field(default_factory=lambda: [40, 20, 13])
    unknown_bias: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0])
    threads: int = 2
    out: str | None = field(default=None, metadata={"help": "write the table as JSON here"})


@torch.inference_mode()
def clip_scores(model: KeywordSpotter, wave: torch.Tensor, warp: float = 1.0, cepstra: int = 0) -> torch.Tensor:
    """Clip log-posteriors (clips, classes), the normalised log-mel warped and/or smoothed to `cepstra` first."""
    import torchaudio.functional as AF
    mels = model.normalize(model.frontend(wave))
    if warp != 1.0:
        mels = warp_mel_axis(mels, warp)
    if cepstra:
        dct = AF.create_dct(cepstra, mels.shape[-1], "ortho")         # (mels, cepstra), orthonormal columns
        mels = mels @ dct @ dct.t()
    return model.clip_scores(model.classify(mels))


def main(cfg: ProbeConfig) -> dict:
    torch.set_num_threads(cfg.threads)
    model = load_model(cfg.model or shipped_model())
    root = resolve_root(cfg.heldout, "--heldout")
    items = build_splits(root, model.labels, seed=0, flag="--heldout")["testing"]
    if not items:
        raise UserError(f"--heldout {root}: its testing split is empty")
    clips = ClipDataset(items, model.config.features.sample_rate)
    wave = torch.stack([clips[i][0] for i in range(len(clips))])
    y = torch.tensor([it.label for it in items])
    unknown = model.labels.index("_unknown_") if "_unknown_" in model.labels else None
    is_keyword = torch.tensor([not model.labels[i].startswith("_") for i in y.tolist()])

    is_unknown = y == unknown if unknown is not None else torch.zeros_like(is_keyword)

    def row(transform: str, scores: torch.Tensor) -> dict:
        right = (scores.argmax(1) == y).float()

        def share(mask: torch.Tensor) -> float | None:
            return right[mask].mean().item() if mask.any() else None
        return {"transform": transform, "accuracy": right.mean().item(),
                "keyword_accuracy": share(is_keyword), "unknown_accuracy": share(is_unknown)}

    rows = [row("none", base := clip_scores(model, wave))]
    rows += [row(f"stretch {s:g}", clip_scores(model, stretch(wave, round(20 * s), 20))) for s in cfg.stretches]
    rows += [row(f"warp {w:g}", clip_scores(model, wave, warp=w)) for w in cfg.warps]
    rows += [row(f"cepstra {n}", clip_scores(model, wave, cepstra=n)) for n in cfg.cepstra
             if 0 < n <= model.config.features.n_mels]
    if unknown is not None:
        for d in cfg.unknown_bias:
            shifted = base.clone()
            shifted[:, unknown] -= d
            rows.append(row(f"unknown bias -{d:g}", shifted))
    # The untransformed misses on keyword clips: how many went to `_unknown_`, how many had the word second.
    wrong = is_keyword & (base.argmax(1) != y)
    rank = (base > base.gather(1, y[:, None])).sum(1)
    misses = {"keyword_clips_wrong": int(wrong.sum()), "called_unknown": int((wrong & (base.argmax(1) == unknown)).sum())
              if unknown is not None else 0, "right_word_second": int((wrong & (rank == 1)).sum())}
    print(f"{len(items)} clips of {root} ({int(is_keyword.sum())} keywords), model {cfg.model or 'shipped'}; "
          f"{misses['keyword_clips_wrong']} keyword clips wrong: {misses['called_unknown']} called _unknown_, "
          f"{misses['right_word_second']} with the right word second")
    print("| transform | accuracy | keyword clips | _unknown_ clips |\n|---|---|---|---|")
    for r in rows:
        kw, unk = ("—" if v is None else f"{v:.3f}" for v in (r["keyword_accuracy"], r["unknown_accuracy"]))
        print(f"| {r['transform']} | {r['accuracy']:.3f} | {kw} | {unk} |")
    result = {"heldout": str(root), "model": cfg.model or "shipped", "clips": len(items), "misses": misses,
              "rows": rows}
    if cfg.out:
        write_json_atomic(cfg.out, {"config": cfg.__dict__, **result})
    return result


if __name__ == "__main__":
    main_entry(main, ProbeConfig, "python benchmarks/audio_heldout_probe.py")
