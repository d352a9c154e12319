"""The LightningModule of keyword-spotting training: augmentation on the training device, the two-clip
stream loss, clip-level validation metrics; the optimiser is ssm_core's shared recipe."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from ssm_core.lightning_module import TaskModule

from .augment import (
    channel,
    freq_warp,
    mic_noise,
    mix_noise,
    room_reverb,
    spec_augment,
    speed_perturb,
    time_shift,
)
from .model import KeywordSpotter, KWSConfig


class KWSModule(TaskModule):
    def __init__(self, kws: dict, augment: dict, optim: dict, total_steps: int | None = None):
        """kws: KWSConfig as a dict (load_model reads it back from the checkpoint); augment: the training
        config's augmentation options (audio.train.AUGMENT_FIELDS; a checkpoint of before the channel
        augmentations has none of them: they are off); optim: OptimConfig as a dict."""
        super().__init__(optim, total_steps)
        self.save_hyperparameters()
        self.model = KeywordSpotter(KWSConfig.from_dict(kws))
        self.augment = augment
        n = len(self.model.labels)
        self.val_acc = MulticlassAccuracy(n, average="micro")
        self.val_f1 = MulticlassF1Score(n, average="macro")
        self.register_buffer("noise_bank", torch.zeros(0), persistent=False)

    def warmup_steps(self, total_steps: int) -> int:
        # At most a tenth of the run (+1), so that short runs (tests, smoke runs) still reach the peak.
        return min(self.optim.warmup_steps, total_steps // 10 + 1)

    def augment_wave(self, wave: torch.Tensor) -> torch.Tensor:
        """The waveform augmentations, in float32 whatever the trainer's precision: under bf16 autocast the
        resampler's convolution would hand back bfloat16 (8 mantissa bits: audio quantised at about -48 dB,
        and cuFFT has no bfloat16, so the room and channel filters after it fail on the GPU)."""
        c = self.augment
        sr = self.model.config.features.sample_rate
        with torch.autocast(wave.device.type, enabled=False):
            wave = speed_perturb(wave.float(), c["speed_perturb"])
            wave = time_shift(wave, int(c["time_shift_ms"] * sr / 1000))
            # The order of a recording: the room, the noise in it, the microphone and line, the mic's hiss, the level.
            wave = room_reverb(wave, c.get("reverb_prob", 0.0), sr)
            wave = mix_noise(wave, self.noise_bank, c["noise_prob"], c["snr_db"])
            wave = channel(wave, c.get("channel_prob", 0.0), c.get("telephone_prob", 0.0), sr)
            wave = mic_noise(wave, c.get("mic_noise_prob", 0.0), c.get("mic_snr_db", [10.0, 40.0]))
            gain_db = torch.empty(wave.shape[0], 1, device=wave.device).uniform_(-1, 1) * c["gain_db"]
            return wave * 10 ** (gain_db / 20)

    def training_step(self, batch, _):
        wave, y = batch
        c, m = self.augment, self.model
        wave = self.augment_wave(wave)
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
