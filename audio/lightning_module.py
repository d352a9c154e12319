"""The LightningModule of keyword-spotting training: augmentation on the training device, the two-clip
stream loss, clip-level validation metrics; the optimiser is ssm_core's shared recipe."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
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
from .data import SILENCE, UNKNOWN
from .model import KeywordSpotter, KWSConfig


class KWSModule(TaskModule):
    def __init__(self, kws: dict, augment: dict, optim: dict, total_steps: int | None = None,
                 phone_loss: float = 0.0, n_phones: int = 0, non_keyword_frames: float = 0.0):
        """kws: KWSConfig as a dict (load_model reads it back from the checkpoint); augment: the training
        config's augmentation options (audio.train.AUGMENT_FIELDS; a checkpoint of before the channel
        augmentations has none of them: they are off); optim: OptimConfig as a dict; phone_loss: the weight
        of the auxiliary phone CTC loss over `n_phones` phones (0: none); non_keyword_frames: the weight of
        the loss on every frame of the clips that hold no keyword (0: none)."""
        super().__init__(optim, total_steps)
        self.save_hyperparameters()
        self.model = KeywordSpotter(KWSConfig.from_dict(kws))
        # Training only (not part of the exported model): per-frame phone posteriors, CTC's blank first.
        # Every engine says the same phones, so a loss on them pulls the encoder towards what the words share
        # rather than what one engine's rendering of a whole word sounds like.
        self.phone_loss = phone_loss
        self.phone_head = nn.Linear(self.model.config.encoder.d_model, n_phones + 1) if phone_loss > 0 else None
        self.non_keyword_frames = non_keyword_frames
        self.register_buffer("non_keyword", torch.tensor(
            [label in (SILENCE, UNKNOWN) for label in self.model.labels]), persistent=False)
        self.augment = augment
        n = len(self.model.labels)
        self.val_acc = MulticlassAccuracy(n, average="micro")
        self.val_f1 = MulticlassF1Score(n, average="macro")
        self.register_buffer("noise_bank", torch.zeros(0), persistent=False)

    def optimized_module(self) -> nn.Module:
        if self.phone_head is None:
            return self.model
        return nn.ModuleDict({"model": self.model, "phone_head": self.phone_head})

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
        wave, y = batch[:2]
        c, m = self.augment, self.model
        wave = self.augment_wave(wave)
        # Another clip of the batch, then the clip: the first is scored from a fresh state, the second with
        # the state another word left behind, as on a stream. (The whole clip: a word may sit anywhere
        # before its label frames, so a cut-down prefix could lose the word its label names.)
        prefix = wave.roll(1, 0)
        feats = freq_warp(m.features(torch.cat([prefix, wave], dim=1)), c["freq_warp"])
        feats = spec_augment(feats, c["freq_mask"], c["time_mask"])
        hidden = m.encoder(feats)
        logits = m.head(hidden).float()
        k, t1 = m.config.label_frames, m.config.features.num_frames(prefix.shape[1])
        loss = 0.5 * (F.cross_entropy(logits[:, -k:].flatten(0, 1), y.repeat_interleave(k))
                      + F.cross_entropy(logits[:, t1 - k: t1].flatten(0, 1), y.roll(1, 0).repeat_interleave(k)))
        self.log("train_loss", loss, prog_bar=True)
        if self.non_keyword_frames:
            loss = loss + self.non_keyword_frames * self.non_keyword_loss(logits, y, t1)
        if self.phone_head is not None:
            ctc = self.phone_ctc(hidden, *batch[2:])
            self.log("phone_loss", ctc)
            loss = loss + self.phone_loss * ctc
        return loss

    def non_keyword_loss(self, logits: torch.Tensor, y: torch.Tensor, t1: int) -> torch.Tensor:
        """Cross-entropy of every frame of the clips that hold no keyword (`_unknown_` words, `_silence_`)
        against their class, beyond the label frames: nothing in such a clip is a keyword at any moment, so a
        keyword's posterior rising in the middle of "yet" (a false alarm "yes" on a stream) is an error there.
        A keyword clip's frames before its label frames stay free (its word is not over). The first
        label_frames of the second clip are left free too: the prefix's keyword may still be decided there."""
        k = self.model.config.label_frames
        target = torch.full(logits.shape[:2], -1, dtype=torch.long, device=logits.device)
        first, second = y.roll(1, 0), y
        target[:, :t1] = torch.where(self.non_keyword[first], first, -1)[:, None]
        target[:, t1 + k:] = torch.where(self.non_keyword[second], second, -1)[:, None]
        valid = (target >= 0).flatten()
        ce = F.cross_entropy(logits.flatten(0, 1), target.clamp_min(0).flatten(), reduction="none")
        return (ce * valid).sum() / valid.sum().clamp_min(1)      # 0, not NaN, in a batch of keywords only

    def phone_ctc(self, hidden: torch.Tensor, phones: torch.Tensor, n_phones: torch.Tensor) -> torch.Tensor:
        """CTC of the two-clip sequence's frames against the prefix clip's phones, then the clip's."""
        both = torch.cat([phones.roll(1, 0), phones], dim=1)
        slot = torch.arange(phones.shape[1], device=phones.device)
        mask = torch.cat([slot < n_phones.roll(1, 0)[:, None], slot < n_phones[:, None]], dim=1)
        log_probs = self.phone_head(hidden).float().log_softmax(-1).transpose(0, 1)     # (frames, batch, phones)
        frames = torch.full((hidden.shape[0],), hidden.shape[1], dtype=torch.long, device=hidden.device)
        return F.ctc_loss(log_probs, both[mask], frames, mask.sum(1), blank=0, zero_infinity=True)

    def validation_step(self, batch, _):
        wave, y = batch
        scores = self.model.clip_scores(self.model(wave))
        self.val_acc(scores, y)
        self.val_f1(scores, y)
        self.log("val_loss", F.nll_loss(scores, y), prog_bar=False)
        self.log("val_acc", self.val_acc, prog_bar=True)
        self.log("val_f1", self.val_f1)
