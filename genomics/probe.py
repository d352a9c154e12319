"""Linear probes on embeddings of a pretrained DNA model: scikit-learn logistic regression, k-fold
cross-validated accuracy and Matthews correlation.

    python -m genomics.probe --checkpoint runs/genomics --task motif        # planted motif on the demo chain
    python -m genomics.probe --checkpoint runs/genomics --task species      # demo "Great Apes": 3 species
    python -m genomics.probe --checkpoint runs/genomics --fasta-per-class human.fa chimp.fa gorilla.fa
    python -m genomics.probe --checkpoint runs/genomics --csv labelled.csv  # columns: sequence,label

With --fasta-per-class each file is a class (named after the file): records no longer than --window are
samples as they are, longer records give --samples-per-class random windows (the species setting).
Writes <output-dir>/probe_<task>.json.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from ssm_core.cli import UserError, main_entry
from ssm_core.io import write_json_atomic
from ssm_core.training import prepare_output_dir

from . import demo
from . import tokenizer as tok
from .common import embed_sequences, load_model
from .data import Genome, WindowSampler


@dataclass
class ProbeConfig:
    checkpoint: str = field(default="runs/genomics", metadata={"help": "genomics.pretrain output folder"})
    task: Literal["files", "motif", "species"] = field(default="files", metadata={
        "help": "files (--fasta-per-class / --csv), or a built-in demo task"})
    fasta_per_class: list[str] = field(default_factory=list)
    csv: str | None = field(default=None, metadata={"help": "CSV with columns sequence,label"})
    window: int = field(default=1024, metadata={"help": "window length for long records / species windows"})
    samples_per_class: int = 100
    folds: int = 5
    batch_size: int = 32
    output_dir: str | None = field(default=None, metadata={"help": "default: the checkpoint folder"})
    device: str = "auto"
    seed: int = 0
    cache_dir: str | None = None

    def __post_init__(self):
        if self.task == "files" and not self.fasta_per_class and not self.csv:
            raise ValueError("give --fasta-per-class FILE FILE..., --csv FILE, or --task motif|species")
        if self.folds < 2 or self.window < 2 or self.samples_per_class < 1:
            raise ValueError("--folds must be >= 2, --window >= 2, --samples-per-class >= 1")


def from_fasta_per_class(paths: list[str], window: int, per_class: int, seed: int, cache_dir) -> tuple[list, np.ndarray, list]:
    if len(paths) < 2:
        raise UserError("--fasta-per-class: give at least two files (one per class)")
    seqs, labels, names = [], [], []
    for k, p in enumerate(paths):
        genome = Genome.open([p], cache_dir, flag="--fasta-per-class")
        names.append(Path(p).stem)
        short = [i for i, c in enumerate(genome.contigs) if c.length <= window]
        if len(short) == len(genome.contigs):          # every record is one sample
            seqs += [tok.encode_bytes(genome.fetch(i, 0, genome.contigs[i].length)) for i in short]
            labels += [k] * len(short)
        else:                                           # long records: random windows of them
            long = [(i, 0, c.length) for i, c in enumerate(genome.contigs) if c.length > window]
            ids = WindowSampler(genome, long, "test", seed + k, max_n_frac=0.1).windows(0, per_class, window)
            seqs += list(ids)
            labels += [k] * per_class
    return seqs, np.array(labels), names


def read_labelled_csv(path: str, flag: str = "--csv"):
    """(token id arrays, the label column as a pandas Series) of a CSV with columns sequence,label."""
    import pandas as pd
    if not Path(path).is_file():
        raise UserError(f"{flag} {path}: no such file")
    try:
        df = pd.read_csv(path)
    except (ValueError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise UserError(f"{flag} {path}: not a readable CSV ({str(e).splitlines()[0]})") from None
    if not {"sequence", "label"} <= set(df.columns):
        raise UserError(f"{flag} {path}: needs columns 'sequence' and 'label', found {list(df.columns)}")
    if df.empty:
        raise UserError(f"{flag} {path}: no rows")
    bad = df["sequence"].isna() | df["label"].isna()
    if bad.any():
        raise UserError(f"{flag} {path}: row {int(np.argmax(bad.to_numpy())) + 2} has an empty sequence or label")
    return [tok.encode_bytes(str(s)) for s in df["sequence"]], df["label"]


def class_indices(labels, names: list[str] | None = None) -> tuple[np.ndarray, list[str]]:
    """String labels -> (class index per row, sorted class names)."""
    names = names or sorted(labels.astype(str).unique())
    return labels.astype(str).map({n: i for i, n in enumerate(names)}).to_numpy(), names


def from_csv(path: str) -> tuple[list, np.ndarray, list]:
    seqs, labels = read_labelled_csv(path)
    y, names = class_indices(labels)
    return seqs, y, names


def demo_task(task: str, window: int, samples_per_class: int, seed: int, cache_dir) -> tuple[list, np.ndarray, list]:
    """(token id arrays, labels, class names) of a built-in demo task: 'motif' or 'species'."""
    if task == "motif":
        strs, y = demo.motif_task(n=2 * samples_per_class, length=min(window, 200), seed=seed)
        return [tok.encode_bytes(s) for s in strs], y, ["background", "motif"]
    folder = (Path(cache_dir) if cache_dir else demo.cache_root()) / f"species-v{demo.VERSION}"
    paths = [str(p) for p in demo.species_fastas(folder)]
    return from_fasta_per_class(paths, window, samples_per_class, seed, cache_dir)


def cross_validate(X: np.ndarray, y: np.ndarray, folds: int, seed: int) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, matthews_corrcoef
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    counts = np.bincount(y)
    if (counts < folds).any():
        raise UserError(f"every class needs at least --folds {folds} samples; class sizes: {counts.tolist()}")
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0))
    pred = cross_val_predict(clf, X, y, cv=StratifiedKFold(folds, shuffle=True, random_state=seed))
    per_fold = []
    for _tr, te in StratifiedKFold(folds, shuffle=True, random_state=seed).split(X, y):
        per_fold.append(accuracy_score(y[te], pred[te]))
    return {"accuracy": float(accuracy_score(y, pred)), "mcc": float(matthews_corrcoef(y, pred)),
            "accuracy_per_fold": [float(a) for a in per_fold], "majority_baseline": float(counts.max() / counts.sum())}


def main(cfg: ProbeConfig) -> dict:
    model, _, device = load_model(cfg.checkpoint, cfg.device)
    out = prepare_output_dir(cfg.output_dir or Path(cfg.checkpoint), "--output-dir")
    if cfg.task in ("motif", "species"):
        seqs, y, names = demo_task(cfg.task, cfg.window, cfg.samples_per_class, cfg.seed, cfg.cache_dir)
    elif cfg.csv:
        seqs, y, names = from_csv(cfg.csv)
    else:
        seqs, y, names = from_fasta_per_class(cfg.fasta_per_class, cfg.window, cfg.samples_per_class, cfg.seed,
                                              cfg.cache_dir)
    X = np.stack(list(embed_sequences(model, seqs, device, window=cfg.window, batch_size=cfg.batch_size)))
    res = cross_validate(X, y, cfg.folds, cfg.seed)
    task = cfg.task if cfg.task != "files" else (Path(cfg.csv).stem if cfg.csv else "fasta_per_class")
    res.update({"task": task, "classes": names, "n_samples": len(y), "folds": cfg.folds,
                "embedding_dim": int(X.shape[1]), "checkpoint": str(cfg.checkpoint)})
    write_json_atomic(out / f"probe_{task}.json", res)
    print(f"{task}: accuracy {res['accuracy']:.3f} (majority {res['majority_baseline']:.3f}), "
          f"MCC {res['mcc']:.3f}, {cfg.folds}-fold CV over {len(y)} sequences -> {out}/probe_{task}.json")
    return res


if __name__ == "__main__":
    main_entry(main, ProbeConfig, "python -m genomics.probe", description=__doc__.split("\n\n")[0])
