"""Train the streaming keyword spotter with Lightning.

    python -m audio.train --output-dir runs/kws                       # embedded synthetic set (espeak-ng)
    python -m audio.train --data ~/speech_commands_v0.02 --labels 35 --output-dir runs/sc35
    python -m audio.train --config configs/audio/kws_synth.yaml

Each training example is another clip of the batch followed by the clip itself: the loss is the
cross-entropy of the last `label_frames` frames of each, so the model learns to answer both from a fresh
state and with the state a previous word left behind, as it must on a stream. Augmentation on the fly: background-noise mixing at 0-20 dB SNR, time shift, gain, SpecAugment.

Writes <output-dir>/checkpoints/{last,best}.ckpt, <output-dir>/model/ (the best model, for audio.stream),
<output-dir>/metrics.json and <output-dir>/confusion.png (held-out test split).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ssm_core import check_mixer_spec
from ssm_core.cli import UserError, main_entry
from ssm_core.training import (
    TrainConfig,
    make_trainer,
    mixer_field,
    residual_in_fp32_field,
    resume_checkpoint,
)

from .data import ClipDataset, build_splits, label_names, load_noise_bank, resolve_root
from .evaluate import evaluate_items, write_report
from .features import FeatureConfig
from .model import KeywordSpotter, KWSConfig, export_model, load_model
from .synth import KEYWORDS, SynthConfig, ensure_dataset


def synth_config(size: str, seed: int) -> SynthConfig:
    """The embedded dataset: 'full' (35 words, 17 voices), or 'tiny' for tests and smoke runs."""
    if size == "full":
        return SynthConfig(seed=seed)
    return SynthConfig(words=KEYWORDS + ["cat"], train_voices=["en-us+m1", "en+f2"], val_voices=["en-us+m7"],
                       test_voices=["en-us+f5"], rates=[160], pitches=[50], noise_seconds=3.0, seed=seed)


@dataclass
class AudioTrainConfig(TrainConfig):
    output_dir: str = "runs/audio"
    max_steps: int = 3000
    batch_size: int = 64
    data: str | None = field(default=None, metadata={
        "help": "Speech Commands folder (or torchaudio download root); default: the embedded synthetic set"})
    labels: Literal["12", "35"] = field(default="12", metadata={
        "help": "12: 10 keywords + _silence_ + _unknown_; 35: every word"})
    synth_size: Literal["full", "tiny"] = field(default="full", metadata={"help": "size of the embedded set"})
    synth_cache: str | None = field(default=None, metadata={"help": "cache folder of the embedded set"})
    n_mels: int = 80
    d_model: int = 128
    n_layer: int = 4
    d_state: int = 16
    expand: int = 2
    mixer: str = mixer_field()
    residual_in_fp32: bool = residual_in_fp32_field()
    label_frames: int = 15
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 100
    noise_prob: float = 0.8
    snr_db: list[float] = field(default_factory=lambda: [0.0, 20.0])
    time_shift_ms: float = 100.0
    gain_db: float = 6.0
    freq_warp: float = field(default=0.1, metadata={
        "help": "stretch each example's mel axis by a random factor in 1 +- this (VTLP-like speaker warp; 0: off)"})
    speed_perturb: float = field(default=0.1, metadata={
        "help": "resample clips by a random factor in 1 +- this (tempo and pitch together; 0: off)"})
    freq_mask: int = field(default=10, metadata={"help": "SpecAugment: widest frequency mask (mel bins)"})
    time_mask: int = field(default=10, metadata={"help": "SpecAugment: widest time mask (frames)"})
    val_every: int = field(default=200, metadata={"help": "validate every N training steps"})

    def __post_init__(self):
        super().__post_init__()
        check_mixer_spec(self.mixer)
        if self.lr <= 0:
            raise ValueError(f"--lr: must be > 0, got {self.lr}")
        if len(self.snr_db) != 2 or self.snr_db[0] > self.snr_db[1]:
            raise ValueError(f"--snr-db: expected two values LOW HIGH, got {self.snr_db}")
        if not 0 <= self.freq_warp < 0.5:
            raise ValueError(f"--freq-warp: expected 0 <= value < 0.5, got {self.freq_warp}")
        if not 0 <= self.speed_perturb < 0.5:
            raise ValueError(f"--speed-perturb: expected 0 <= value < 0.5, got {self.speed_perturb}")
        if not 0 <= self.noise_prob <= 1:
            raise ValueError(f"--noise-prob: expected 0 to 1, got {self.noise_prob}")


# --- augmentation (batched, on the training device) ---------------------------------------------------------
def time_shift(wave: torch.Tensor, max_shift: int) -> torch.Tensor:
    """Shift each clip by up to +-max_shift samples, filling with zeros."""
    if max_shift <= 0:
        return wave
    b, n = wave.shape
    shift = torch.randint(-max_shift, max_shift + 1, (b, 1), device=wave.device)
    src = torch.arange(n, device=wave.device) - shift
    valid = (src >= 0) & (src < n)
    return torch.gather(wave, 1, src.clamp(0, n - 1)) * valid


def speed_perturb(wave: torch.Tensor, max_change: float, groups: int = 4) -> torch.Tensor:
    """Resample each of `groups` slices of the batch by its own factor in [1 - max_change, 1 + max_change]
    (Kaldi-style speed perturbation: tempo and pitch move together, a cheap stand-in for new speakers), then
    cut or zero-pad back to the clip length. Factors are multiples of 1/20 so the polyphase filter stays small."""
    if max_change <= 0:
        return wave
    import torchaudio.functional as AF
    n = wave.shape[1]
    steps = max(1, int(max_change * 20))
    out = []
    for part in wave.chunk(groups):
        new = 20 + int(torch.randint(-steps, steps + 1, ()))
        if new != 20:
            part = AF.resample(part, 20, new)[:, :n]
            part = F.pad(part, (0, n - part.shape[1]))
        out.append(part)
    return torch.cat(out)


def mix_noise(wave: torch.Tensor, bank: torch.Tensor, prob: float, snr_db: list[float]) -> torch.Tensor:
    """Add a random cut of the noise bank to a share `prob` of the clips, at a random SNR."""
    b, n = wave.shape
    if bank.numel() <= n or prob <= 0:
        return wave
    start = torch.randint(0, bank.numel() - n, (b, 1), device=wave.device)
    noise = bank[start + torch.arange(n, device=wave.device)]
    snr = torch.empty(b, 1, device=wave.device).uniform_(*snr_db)
    p_sig = wave.pow(2).mean(1, keepdim=True).clamp_min(1e-6)   # silent clips get noise at a fixed level
    p_noise = noise.pow(2).mean(1, keepdim=True).clamp_min(1e-8)
    scale = torch.sqrt(p_sig / (p_noise * 10 ** (snr / 10)))
    use = (torch.rand(b, 1, device=wave.device) < prob).float()
    return wave + use * scale * noise


def freq_warp(feats: torch.Tensor, max_change: float) -> torch.Tensor:
    """Stretch or squeeze each example's mel axis by a factor in [1 - max_change, 1 + max_change] (linear
    interpolation between bins, edge bin repeated): a vocal-tract-length change moves the formants this way
    while leaving the timing alone. feats (b, frames, mels)."""
    if max_change <= 0:
        return feats
    b, _, m = feats.shape
    alpha = 1 + (torch.rand(b, 1, device=feats.device) * 2 - 1) * max_change
    pos = (torch.arange(m, device=feats.device, dtype=feats.dtype) / alpha).clamp(0, m - 1)   # (b, mels)
    lo = pos.floor().long()
    hi = (lo + 1).clamp(max=m - 1)
    frac = (pos - lo).unsqueeze(1)
    lo_v, hi_v = (feats.gather(2, i.unsqueeze(1).expand(-1, feats.shape[1], -1)) for i in (lo, hi))
    return torch.lerp(lo_v, hi_v, frac)


def spec_augment(feats: torch.Tensor, freq_mask: int, time_mask: int) -> torch.Tensor:
    """Two frequency and two time masks per example (set to 0, the normalised mean)."""
    import torchaudio.functional as AF
    x = feats.transpose(1, 2).unsqueeze(1)          # (b, 1, mels, frames)
    for _ in range(2):
        if freq_mask > 0:
            x = AF.mask_along_axis_iid(x, freq_mask, 0.0, axis=2)
        if time_mask > 0:
            x = AF.mask_along_axis_iid(x, time_mask, 0.0, axis=3)
    return x.squeeze(1).transpose(1, 2)


# --- Lightning module ---------------------------------------------------------------------------------------
def _lightning_module():
    import lightning as L
    from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

    class KWSModule(L.LightningModule):
        def __init__(self, kws: dict, train: dict):
            super().__init__()
            self.save_hyperparameters()
            self.model = KeywordSpotter(KWSConfig(**kws))
            self.cfg = train
            n = len(self.model.labels)
            self.val_acc = MulticlassAccuracy(n, average="micro")
            self.val_f1 = MulticlassF1Score(n, average="macro")
            self.register_buffer("noise_bank", torch.zeros(0), persistent=False)

        def training_step(self, batch, _):
            wave, y = batch
            c, m = self.cfg, self.model
            sr = m.config.features.sample_rate
            wave = speed_perturb(wave, c["speed_perturb"])
            wave = time_shift(wave, int(c["time_shift_ms"] * sr / 1000))
            wave = wave * 10 ** (torch.empty(wave.shape[0], 1, device=wave.device).uniform_(-1, 1) * c["gain_db"] / 20)
            wave = mix_noise(wave, self.noise_bank, c["noise_prob"], c["snr_db"])
            # Another clip of the batch, then the clip: the first is scored from a fresh state, the second with
            # the state another word left behind, as on a stream. (The whole clip: a word may sit anywhere
            # before its label frames, so a cut-down prefix could lose the word its label names.)
            prefix = wave.roll(1, 0)
            feats = freq_warp(m.features(torch.cat([prefix, wave], dim=1)), c["freq_warp"])
            feats = spec_augment(feats, c["freq_mask"], c["time_mask"])
            logits = m.classify(feats)
            k, t1 = m.config.label_frames, m.config.features.num_frames(prefix.shape[1])
            loss = 0.5 * (F.cross_entropy(logits[:, -k:].flatten(0, 1), y.repeat_interleave(k))
                          + F.cross_entropy(logits[:, t1 - k: t1].flatten(0, 1), y.roll(1, 0).repeat_interleave(k)))
            self.log("train_loss", loss, prog_bar=True)
            return loss

        def validation_step(self, batch, _):
            wave, y = batch
            scores = self.model.clip_scores(self.model(wave))
            self.val_acc(scores, y)
            self.val_f1(scores, y)
            self.log("val_loss", F.nll_loss(scores, y), prog_bar=False)
            self.log("val_acc", self.val_acc, prog_bar=True)
            self.log("val_f1", self.val_f1)

        def configure_optimizers(self):
            decay = [p for n, p in self.named_parameters() if p.dim() >= 2]
            no_decay = [p for n, p in self.named_parameters() if p.dim() < 2]
            opt = torch.optim.AdamW([{"params": decay, "weight_decay": self.cfg["weight_decay"]},
                                     {"params": no_decay, "weight_decay": 0.0}], lr=self.cfg["lr"])
            total = max(1, int(self.trainer.estimated_stepping_batches))
            warm = min(self.cfg["warmup_steps"], total // 10 + 1)

            def schedule(step):  # linear warm-up, cosine decay to 5%
                if step < warm:
                    return (step + 1) / warm
                return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))
            sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    return KWSModule


def feature_stats(dataset: ClipDataset, model: KeywordSpotter, n: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-mel mean and std of the log-mel features over (up to) n training clips."""
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(dataset), generator=g)[:n].tolist()
    with torch.no_grad():
        feats = model.frontend(torch.stack([dataset[i][0] for i in idx]))
    return feats.mean((0, 1)), feats.std((0, 1)).clamp_min(1e-3)


def dataset_root(cfg: AudioTrainConfig) -> Path:
    if cfg.data:
        return resolve_root(cfg.data)
    return ensure_dataset(synth_config(cfg.synth_size, cfg.seed), cfg.synth_cache)


def main(cfg: AudioTrainConfig) -> dict:
    root = dataset_root(cfg)
    labels = label_names(root, cfg.labels)
    splits = build_splits(root, labels, seed=cfg.seed)
    for s in ("train", "validation"):
        if not splits[s]:
            raise UserError(f"--data {root}: the {s} split is empty")
    kws = KWSConfig(labels=labels, features=FeatureConfig(n_mels=cfg.n_mels), d_model=cfg.d_model,
                    n_layer=cfg.n_layer, d_state=cfg.d_state, expand=cfg.expand, mixer=cfg.mixer,
                    residual_in_fp32=cfg.residual_in_fp32, label_frames=cfg.label_frames)
    KWSModule = _lightning_module()
    module = KWSModule(kws.to_dict(), asdict(cfg))
    sr = kws.features.sample_rate
    train_ds, val_ds = ClipDataset(splits["train"], sr), ClipDataset(splits["validation"], sr)
    mean, std = feature_stats(train_ds, module.model)
    module.model.feat_mean.copy_(mean)
    module.model.feat_std.copy_(std)
    module.noise_bank = load_noise_bank(root, sr)
    loader = dict(batch_size=cfg.batch_size, num_workers=cfg.num_workers, persistent_workers=cfg.num_workers > 0)
    train_dl = DataLoader(train_ds, shuffle=True, drop_last=len(train_ds) > cfg.batch_size, **loader)
    val_dl = DataLoader(val_ds, shuffle=False, **loader)
    print(f"audio.train: {len(train_ds)} train / {len(val_ds)} validation clips, {len(labels)} classes, "
          f"{module.model.num_parameters():,} parameters, data {root}")
    # Validate every val_every steps counted across epochs (and at the last step when it is a multiple).
    interval = min(cfg.val_every, cfg.max_steps) if cfg.max_steps > 0 else cfg.val_every
    trainer = make_trainer(cfg, monitor="val_acc", mode="max", val_check_interval=interval,
                           check_val_every_n_epoch=None)
    trainer.fit(module, train_dl, val_dl, ckpt_path=resume_checkpoint(cfg))

    out = Path(cfg.output_dir)
    best = out / "checkpoints" / "best.ckpt"
    model = load_model(best if best.is_file() else out / "checkpoints" / "last.ckpt")
    export_model(model, out / "model")
    model.to(trainer.strategy.root_device)     # evaluate where training ran (the GPU if any)
    metrics = {"labels": labels, "num_parameters": model.num_parameters(), "steps": trainer.global_step,
               "data": str(root)}
    for split in ("validation", "testing"):
        if splits[split]:
            result = evaluate_items(model, ClipDataset(splits[split], sr), cfg.batch_size, desc=split)
            metrics[split] = result
    write_report(out, metrics, labels, split="testing" if splits["testing"] else "validation")
    t = metrics.get("testing", metrics["validation"])
    print(f"audio.train: test accuracy {t['accuracy']:.4f}, macro-F1 {t['macro_f1']:.4f}; "
          f"model in {out / 'model'}, metrics in {out / 'metrics.json'}")
    return metrics


if __name__ == "__main__":
    main_entry(main, AudioTrainConfig, "python -m audio.train")
