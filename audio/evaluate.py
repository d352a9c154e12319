"""Evaluate a keyword spotter on a Speech Commands split: accuracy, macro-F1, confusion matrix PNG.

    python -m audio.evaluate --model runs/kws/model --data ~/speech_commands_v0.02 --output-dir runs/kws/eval
    python -m audio.evaluate --model runs/kws/model            # the embedded synthetic set's test voices
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch.utils.data import DataLoader

from ssm_core.cli import UserError, main_entry
from ssm_core.io import save_figure_atomic, write_json_atomic
from ssm_core.training import prepare_output_dir

from .data import ClipDataset, build_splits, resolve_root
from .model import KeywordSpotter, load_model
from .synth import available_engines, ensure_dataset, synth_config


@torch.no_grad()
@torch.inference_mode()
def evaluate_items(model: KeywordSpotter, dataset: ClipDataset, batch_size: int = 64, desc: str = "eval") -> dict:
    """Clip-level accuracy and macro-F1 (torchmetrics) and the confusion matrix (rows: true class)."""
    from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix, MulticlassF1Score
    from tqdm import tqdm
    n = len(model.labels)
    acc, f1 = MulticlassAccuracy(n, average="micro"), MulticlassF1Score(n, average="macro")
    confusion = MulticlassConfusionMatrix(n)
    model.eval()
    device = model.feat_mean.device
    for wave, y in tqdm(DataLoader(dataset, batch_size=batch_size), desc=desc, leave=False):
        pred = model.clip_scores(model(wave.to(device))).argmax(-1).cpu()
        acc.update(pred, y)
        f1.update(pred, y)
        confusion.update(pred, y)
    return {"accuracy": float(acc.compute()), "macro_f1": float(f1.compute()), "clips": len(dataset),
            "confusion": confusion.compute().tolist()}


def plot_confusion(confusion: list[list[int]], labels: list[str], title: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    cm = np.asarray(confusion, dtype=float)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    size = max(5.0, 0.35 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=90)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if len(labels) <= 15:
        for i in range(len(labels)):
            for j in range(len(labels)):
                if cm[i, j]:
                    ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if norm[i, j] > 0.5 else "black")
    return fig


def write_report(out_dir: str | Path, metrics: dict, labels: list[str], split: str) -> None:
    """metrics.json and confusion.png (of `split`) into out_dir."""
    out = Path(out_dir)
    write_json_atomic(out / "metrics.json", metrics)
    r = metrics[split]
    fig = plot_confusion(r["confusion"], labels, f"{split}: accuracy {r['accuracy']:.3f}, macro-F1 {r['macro_f1']:.3f}")
    save_figure_atomic(fig, out / "confusion.png")


@dataclass
class EvalConfig:
    model: str = field(default="", metadata={"help": "exported model folder, training output folder or .ckpt"})
    data: str | None = field(default=None, metadata={
        "help": "Speech Commands folder; default: the embedded synthetic set the model was trained on"})
    split: Literal["testing", "validation", "train"] = "testing"
    synth_size: Literal["full", "tiny"] = "full"
    synth_cache: str | None = None
    synth_engines: list[str] | None = field(default=None, metadata={
        "help": "training engines of the embedded set (its test voices are the same; the set is another "
                "folder); default: every one installed, as audio.train"})
    batch_size: int = 64
    seed: int = 0
    output_dir: str | None = field(default=None, metadata={"help": "write metrics.json and confusion.png here"})

    def __post_init__(self):
        if not self.model:
            raise ValueError("--model: required (a model folder or checkpoint made by audio.train)")


def main(cfg: EvalConfig) -> dict:
    model = load_model(cfg.model)
    if cfg.data:
        root = resolve_root(cfg.data)
    else:
        engines = cfg.synth_engines or available_engines(cfg.synth_cache)
        root = ensure_dataset(synth_config(cfg.synth_size, cfg.seed, engines), cfg.synth_cache)
    splits = build_splits(root, model.labels, seed=cfg.seed)
    if not splits[cfg.split]:
        raise UserError(f"--data {root}: the {cfg.split} split is empty")
    ds = ClipDataset(splits[cfg.split], model.config.features.sample_rate)
    result = evaluate_items(model, ds, cfg.batch_size, desc=cfg.split)
    if cfg.output_dir:
        out = prepare_output_dir(cfg.output_dir)
        write_report(out, {"model": cfg.model, "data": str(root), "labels": model.labels, cfg.split: result},
                     model.labels, cfg.split)
    print(f"audio.evaluate: {cfg.split} ({len(ds)} clips): accuracy {result['accuracy']:.4f}, "
          f"macro-F1 {result['macro_f1']:.4f}")
    return result


if __name__ == "__main__":
    main_entry(main, EvalConfig, "python -m audio.evaluate")
