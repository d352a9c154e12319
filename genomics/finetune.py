"""Fine-tune a pretrained DNA model on a labelled task, beside a k-mer logistic-regression baseline.

    python -m genomics.finetune --checkpoint runs/genomics --task motif          # demo: planted motif
    python -m genomics.finetune --checkpoint runs/genomics --task species        # demo: 3 species
    python -m genomics.finetune --checkpoint runs/genomics --csv train.csv --test-csv test.csv
    python -m genomics.finetune --checkpoint runs/genomics --folder human_nontata_promoters/   # Genomic Benchmarks

Data: a CSV with columns sequence,label; or a folder with one subfolder per class (files of one sequence
each, as Genomic Benchmarks ships them, or FASTA files), itself optionally under train/ and test/. Labels
that are all numbers with a fraction (or --target regression) make a regression task, else classes.
Without a test set, --test-frac of the data is held out; --val-frac of the rest is the validation split that
early stopping watches (stratified for classes, drawn with --seed).

Model: the pretrained backbone, mean- and max-pooled over the sequence (both strands averaged for
RC-equivariant models), batch-normalised, and a linear head; the whole backbone trains (at --backbone-lr;
the head at --optim.lr) unless --freeze-backbone. The optimiser is the shared recipe (AdamW that never
decays norms, biases or A_log; --optim.*).
Lightning with early stopping on the validation loss; the best epoch is tested. The baseline is scikit-learn
logistic regression (ridge for regression) on k-mer frequencies, k in --kmer-sizes chosen on the same
validation split, scored on the same test split. Metrics by torchmetrics: accuracy, MCC and AUROC for classes,
R2, Pearson r and MSE for regression. Writes <output-dir>/finetune.json, finetune.png (confusion matrices or
scatter), predictions.tsv, checkpoints/ and logs/.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ssm_core import MambaConfig, MambaModel
from ssm_core.cli import UserError, main_entry
from ssm_core.io import save_figure_atomic, write_json_atomic, write_text_atomic
from ssm_core.lightning_module import TaskModule
from ssm_core.training import OptimConfig, TrainConfig, make_trainer, prepare_output_dir, resolve_accelerator

from . import tokenizer as tok
from .common import load_model, resolve_model_dir
from .data import Genome
from .probe import class_indices, demo_task, read_labelled_csv

SEQ_SUFFIXES = (".txt", ".seq", ".fa", ".fasta", ".fna")


@dataclass
class FinetuneConfig(TrainConfig):
    output_dir: str = field(default="runs/finetune", metadata={"help": "checkpoints, logs, metrics, plots"})
    max_epochs: int | None = 30
    batch_size: int = 32
    checkpoint: str = field(default="runs/genomics", metadata={"help": "genomics.pretrain output or a model folder"})
    task: Literal["files", "motif", "species"] = field(default="files", metadata={
        "help": "files (--csv / --folder), or a built-in demo task"})
    csv: str | None = field(default=None, metadata={"help": "training CSV with columns sequence,label"})
    test_csv: str | None = field(default=None, metadata={"help": "test CSV (default: --test-frac of --csv)"})
    folder: str | None = field(default=None, metadata={"help": "one subfolder per class (optionally under train/ test/)"})
    target: Literal["auto", "classification", "regression"] = "auto"
    freeze_backbone: bool = field(default=False, metadata={"help": "train the head only"})
    # Off by default: on the demo tasks it was level on one and 0.03 worse on the other (three seeds each,
    # docs/genomics.md), so not a gain to make everyone's default.
    probe_init: bool = field(default=False, metadata={
        "help": "start the head as a linear probe: a standardised logistic (ridge) regression fitted on the "
                "pretrained backbone's pooled features of the training split, then train (LP-FT)"})
    # The head's learning rate is --optim.lr. The defaults are the behaviour before the shared recipe: lr
    # 3e-3, decay 0.01, and a constant learning rate (no warm-up, a "cosine" that ends where it starts), as
    # early stopping decides the run's length and a cosine over --max-epochs would assume it.
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-3, weight_decay=0.01, min_lr_ratio=1.0))
    backbone_lr: float = field(default=1e-3, metadata={
        "help": "the backbone's peak learning rate (unless frozen); the schedule scales it as --optim.lr"})
    patience: int = field(default=4, metadata={"help": "early stopping: epochs without a better val loss"})
    val_frac: float = 0.15
    test_frac: float = 0.2
    kmer_sizes: list[int] = field(default_factory=lambda: [2, 3, 4, 5, 6], metadata={
        "help": "k-mer sizes the baseline chooses from on the validation split"})
    window: int = field(default=512, metadata={
        "help": "inputs longer than this are cropped to their central --window bases (demo species: window length)"})
    samples_per_class: int = field(default=300, metadata={"help": "demo tasks: samples per class"})
    cache_dir: str | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.task == "files" and not (self.csv or self.folder):
            raise ValueError("give --csv FILE, --folder DIR, or --task motif|species")
        if self.csv and self.folder:
            raise ValueError("--csv and --folder: give one")
        if not (0 < self.val_frac < 0.5 and 0 < self.test_frac < 0.5):
            raise ValueError("--val-frac and --test-frac: must be in (0, 0.5)")
        if not self.kmer_sizes or min(self.kmer_sizes) < 1 or max(self.kmer_sizes) > 8:
            raise ValueError("--kmer-sizes: give sizes between 1 and 8")
        if self.backbone_lr <= 0:
            raise ValueError(f"--backbone-lr: must be > 0, got {self.backbone_lr}")
        if self.patience < 1 or self.window < 8 or self.samples_per_class < 10:
            raise ValueError("--patience must be >= 1, --window >= 8, --samples-per-class >= 10")


# --- data ---------------------------------------------------------------------------------------------------
def _read_sequences(path: Path) -> list[np.ndarray]:
    """A FASTA's records, or a plain file holding one sequence (whitespace ignored)."""
    raw = path.read_bytes()
    if raw.lstrip().startswith(b">"):
        g = Genome.open([path], flag="--folder")
        return [tok.encode_bytes(g.fetch(i, 0, c.length)) for i, c in enumerate(g.contigs)]
    seq = b"".join(raw.split())
    return [tok.encode_bytes(seq)] if seq else []


def read_class_folder(root: Path) -> tuple[list[np.ndarray], list[str]]:
    """(sequences, class name of each) of a folder with one subfolder per class."""
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise UserError(f"--folder {root}: needs one subfolder per class (at least two), found {len(classes)}")
    seqs, labels = [], []
    for c in classes:
        files = sorted(f for f in c.rglob("*") if f.is_file() and (f.suffix.lower() in SEQ_SUFFIXES))
        got = [s for f in files for s in _read_sequences(f)]
        if not got:
            raise UserError(f"--folder {c}: empty class folder (no {'/'.join(SEQ_SUFFIXES)} files with sequence)")
        seqs += got
        labels += [c.name] * len(got)
    return seqs, labels


def stratified_split(y: np.ndarray, frac: float, seed: int, classify: bool) -> tuple[np.ndarray, np.ndarray]:
    """(kept indices, held-out indices): `frac` held out, per class when classifying."""
    rng = np.random.default_rng(seed)
    groups = [np.nonzero(y == c)[0] for c in np.unique(y)] if classify else [np.arange(len(y))]
    held = []
    for g in groups:
        g = rng.permutation(g)
        held += list(g[:max(1, round(frac * len(g)))] if len(g) > 1 else [])
    held = np.sort(np.array(held, dtype=int))
    return np.setdiff1d(np.arange(len(y)), held), held


def load_data(cfg: FinetuneConfig):
    """{'train'|'valid'|'test': (sequences, targets)}, class names (None for regression), description."""
    import pandas as pd
    test = None
    if cfg.task in ("motif", "species"):
        seqs, y, names = demo_task(cfg.task, cfg.window, cfg.samples_per_class, cfg.seed, cfg.cache_dir)
        raw = pd.Series([names[i] for i in y])
        source = f"demo task {cfg.task}"
    elif cfg.csv:
        seqs, raw = read_labelled_csv(cfg.csv)
        if cfg.test_csv:
            test = read_labelled_csv(cfg.test_csv, "--test-csv")
        source = cfg.csv
    else:
        root = Path(cfg.folder)
        if not root.is_dir():
            raise UserError(f"--folder {root}: no such folder")
        if (root / "train").is_dir() and (root / "test").is_dir():
            seqs, lab = read_class_folder(root / "train")
            test = read_class_folder(root / "test")
            test = (test[0], pd.Series(test[1]))
        else:
            seqs, lab = read_class_folder(root)
        raw = pd.Series(lab)
        source = str(root)
    numeric = pd.to_numeric(raw, errors="coerce")
    regression = cfg.target == "regression" or (
        cfg.target == "auto" and numeric.notna().all() and (numeric % 1 != 0).any())
    if regression and numeric.isna().any():
        raise UserError(f"--target regression: label {raw[numeric.isna()].iloc[0]!r} is not a number")
    if regression:
        y, names = numeric.to_numpy(np.float32), None
    else:
        y, names = class_indices(raw)
        if len(names) < 2:
            raise UserError(f"{source}: one class only ({names[0]!r}); a classifier needs two or more")
    if test is None:
        keep, held = stratified_split(y, cfg.test_frac, cfg.seed, not regression)
        test_part = ([seqs[i] for i in held], y[held])
        seqs, y = [seqs[i] for i in keep], y[keep]
    else:
        t_seqs, t_raw = test
        if regression:
            t_y = pd.to_numeric(t_raw, errors="coerce")
            if t_y.isna().any():
                raise UserError(f"test set: label {t_raw[t_y.isna()].iloc[0]!r} is not a number")
            t_y = t_y.to_numpy(np.float32)
        else:
            unknown = sorted(set(t_raw.astype(str)) - set(names))
            if unknown:
                raise UserError(f"test set: classes {unknown} do not occur in the training data")
            t_y, _ = class_indices(t_raw, names)
        test_part = (t_seqs, t_y)
    tr, va = stratified_split(y, cfg.val_frac, cfg.seed + 1, not regression)
    if not len(va) or not len(tr) or not len(test_part[1]):
        raise UserError(f"{source}: too few samples for train / validation / test splits ({len(y)} rows)")
    data = {"train": ([seqs[i] for i in tr], y[tr]), "valid": ([seqs[i] for i in va], y[va]), "test": test_part}
    for k, (s, t) in data.items():
        data[k] = ([_crop(x, cfg.window) for x in s], t)
    return data, names, source


def _crop(ids: np.ndarray, n: int) -> np.ndarray:
    """The central n tokens of a longer sequence."""
    if len(ids) <= n:
        return ids
    a = (len(ids) - n) // 2
    return ids[a:a + n]


def collate(batch):
    """Right-pad with [PAD]; a mask marks the real positions (pooled over, N included)."""
    n = max(len(s) for s, _ in batch)
    ids = np.full((len(batch), n), tok.PAD, dtype=np.int64)
    for i, (s, _) in enumerate(batch):
        ids[i, :len(s)] = s
    y = torch.tensor(np.array([t for _, t in batch]))
    return torch.from_numpy(ids), torch.from_numpy(ids != tok.PAD), y


# --- model --------------------------------------------------------------------------------------------------
class SequenceModel(nn.Module):
    """Pretrained backbone -> [mean, max] over the sequence's positions -> batch norm -> linear head. The
    mean carries composition; the max lets one position decide (a motif anywhere in the sequence). The
    batch norm standardises the pooled features across sequences, as a StandardScaler before a logistic
    regression: classes that differ by small shifts of the mean (composition) need it."""

    def __init__(self, config: MambaConfig, n_out: int):
        super().__init__()
        self.backbone = MambaModel(config)
        self.head = nn.Sequential(nn.BatchNorm1d(2 * config.d_model), nn.Linear(2 * config.d_model, n_out))

    def _pool(self, ids: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        h = self.backbone(ids)
        mean = (h * m).sum(1) / m.sum(1).clamp(min=1)
        return torch.cat([mean, h.masked_fill(m == 0, float("-inf")).amax(1)], -1)

    def pooled(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask.unsqueeze(-1).float()
        out = self._pool(ids, m)
        if self.backbone.config.rc_equivariant:   # both strands: the prediction is strand-invariant
            out = 0.5 * (out + self._pool(self.backbone.complement[ids.flip(1)], m.flip(1)))
        return out

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.pooled(ids, mask))


class FinetuneModule(TaskModule):
    """SequenceModel + cross-entropy (classes) or MSE (regression); the optimiser is ssm_core's shared recipe,
    with the backbone at `backbone_lr` and the head at optim["lr"]."""

    def __init__(self, model_config: dict, n_out: int, regression: bool, optim: dict, backbone_lr: float,
                 freeze_backbone: bool, total_steps: int | None = None):
        super().__init__(optim, total_steps)
        self.save_hyperparameters()
        self.model = SequenceModel(MambaConfig.from_dict(model_config), n_out)
        # Frozen parameters have requires_grad off, so parameter_groups leaves them out of the optimiser.
        self.model.backbone.requires_grad_(not freeze_backbone)

    def lr_scale(self) -> dict[str, float]:
        return {"backbone": self.hparams.backbone_lr / self.optim.lr}

    def _loss(self, batch):
        ids, mask, y = batch
        out = self.model(ids, mask)
        if self.hparams.regression:
            return F.mse_loss(out.squeeze(-1).float(), y.float()), len(y)
        return F.cross_entropy(out.float(), y.long()), len(y)

    def training_step(self, batch, batch_idx):
        loss, n = self._loss(batch)
        self.log("train_loss", loss, prog_bar=True, batch_size=n)
        return loss

    def validation_step(self, batch, batch_idx):
        loss, n = self._loss(batch)
        self.log("val_loss", loss, prog_bar=True, batch_size=n, on_epoch=True)

    def predict_step(self, batch, batch_idx):
        return self.model(batch[0], batch[1]).float()


def probe_init_head(model: SequenceModel, batches, y: np.ndarray, valid_batches, y_valid: np.ndarray,
                    regression: bool, seed: int, device: str | torch.device = "cpu") -> dict:
    """Linear probing before fine-tuning (LP-FT, Kumar et al. 2022): fit the head to the frozen backbone's
    pooled features first, so that fine-tuning starts from a good classifier instead of pushing a random
    head's gradients into the pretrained features; a head trained by SGD with early stopping also stops far
    short of the optimum a convex solver reaches on a few hundred sequences. The batch norm becomes the
    StandardScaler (running mean and variance = the training features'), the linear layer the regression:
    in eval mode the head then computes exactly the fitted model. Regularisation (C or alpha) is chosen on
    the validation split. The features are computed on `device` (float32); the model is left on the CPU.
    Returns what was fitted."""
    from sklearn.linear_model import LogisticRegression, Ridge

    def features(bs):
        with torch.no_grad():
            return torch.cat([model.pooled(ids.to(device), mask.to(device)).cpu()
                              for ids, mask, _ in bs]).double().numpy()
    was_training = model.training
    model.eval().to(device)
    X, Xv = features(batches), features(valid_batches)
    model.train(was_training).cpu()
    bn, lin = model.head
    mean, var = X.mean(0), X.var(0)
    scale = np.sqrt(var + bn.eps)
    Xs, Xvs = (X - mean) / scale, (Xv - mean) / scale
    best = None
    for reg in (0.01, 0.1, 1.0):
        if regression:
            fit = Ridge(alpha=1.0 / reg).fit(Xs, y)
            score = -float(np.mean((fit.predict(Xvs) - y_valid) ** 2))
        else:
            fit = LogisticRegression(C=reg, max_iter=2000, random_state=seed).fit(Xs, y)
            p = fit.predict_proba(Xvs)[np.arange(len(y_valid)), np.searchsorted(fit.classes_, y_valid)]
            score = float(np.mean(np.log(np.clip(p, 1e-12, 1))))     # validation log-likelihood
        if best is None or score > best[1]:
            best = (reg, score, fit)
    reg, score, fit = best
    coef, intercept = np.atleast_2d(fit.coef_), np.atleast_1d(fit.intercept_)
    if not regression and coef.shape[0] == 1:     # binary: sklearn gives the logit of class 1 only
        coef, intercept = np.vstack([np.zeros_like(coef), coef]), np.array([0.0, intercept[0]])
    with torch.no_grad():
        bn.running_mean.copy_(torch.from_numpy(mean))
        bn.running_var.copy_(torch.from_numpy(var))
        bn.weight.fill_(1.0)
        bn.bias.zero_()
        lin.weight.copy_(torch.from_numpy(coef))
        lin.bias.copy_(torch.from_numpy(intercept))
    return {"regularisation": ("alpha" if regression else "C"), "value": reg if not regression else 1.0 / reg,
            "validation_score": score}


# --- metrics and baseline ----------------------------------------------------------------------------------
def metrics(pred: np.ndarray, y: np.ndarray, n_classes: int | None) -> dict:
    """torchmetrics on predictions (logits (n, C) for classes, values (n,) for regression)."""
    import torchmetrics.functional as M
    p, t = torch.tensor(np.asarray(pred, dtype=np.float32)), torch.tensor(np.asarray(y))
    if n_classes is None:
        p, t = p.reshape(-1), t.float()
        return {"r2": float(M.r2_score(p, t)), "pearson": float(M.pearson_corrcoef(p, t)),
                "mse": float(M.mean_squared_error(p, t))}
    t = t.long()
    prob = p.softmax(-1)
    kw = {"task": "multiclass", "num_classes": n_classes}
    return {"accuracy": float(M.accuracy(prob, t, average="micro", **kw)),
            "mcc": float(M.matthews_corrcoef(prob, t, **kw)),
            "auroc": float(M.auroc(prob, t, **kw)),
            "confusion_matrix": M.confusion_matrix(prob, t, **kw).tolist()}


def kmer_features(seqs: list[np.ndarray], k: int) -> np.ndarray:
    """Frequencies of the 4^k k-mers (windows with N left out), one row per sequence."""
    out = np.zeros((len(seqs), 4 ** k), dtype=np.float32)
    for r, ids in enumerate(seqs):
        b = tok.unmask(ids).astype(np.int64) - tok.A
        if len(b) < k:
            continue
        ok = (b >= 0) & (b < 4)
        win = np.lib.stride_tricks.sliding_window_view(np.where(ok, b, 0), k)
        good = np.lib.stride_tricks.sliding_window_view(ok, k).all(1)
        codes = win[good] @ (4 ** np.arange(k - 1, -1, -1))
        counts = np.bincount(codes, minlength=4 ** k)
        out[r] = counts / max(1, counts.sum())
    return out


def kmer_baseline(data: dict, n_classes: int | None, sizes: list[int], seed: int) -> dict:
    """Logistic regression (ridge for regression) on standardised k-mer frequencies; k chosen on validation."""
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    best = None
    for k in sizes:
        X = {s: kmer_features(data[s][0], k) for s in data}
        if n_classes is None:
            clf = make_pipeline(StandardScaler(), Ridge(alpha=1.0)).fit(X["train"], data["train"][1])
            val = metrics(clf.predict(X["valid"]), data["valid"][1], None)["r2"]
            pred = clf.predict(X["test"])
        else:
            clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=0.1, random_state=seed))
            clf.fit(X["train"], data["train"][1])
            # log-probabilities as "logits": softmax gives back the classifier's probabilities
            val = metrics(np.log(clf.predict_proba(X["valid"]) + 1e-12), data["valid"][1], n_classes)["accuracy"]
            pred = np.log(clf.predict_proba(X["test"]) + 1e-12)
        if best is None or val > best[1]:
            best = (k, val, pred)
    k, val, pred = best
    return {"k": k, "validation": val, "test": metrics(pred, data["test"][1], n_classes), "pred": pred}


def plot(res: dict, names: list[str] | None, y: np.ndarray, pred: np.ndarray, base_pred: np.ndarray, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    for ax, (label, m, p) in zip(axes, (("fine-tuned", res["finetuned"], pred),
                                        (f"{res['baseline']['k']}-mer logistic regression", res["baseline"]["test"],
                                         base_pred))):
        if names is None:
            ax.scatter(y, np.asarray(p).reshape(-1), s=6, alpha=0.5)
            lo, hi = float(np.min(y)), float(np.max(y))
            ax.plot([lo, hi], [lo, hi], "k--", lw=1)
            ax.set(xlabel="true", ylabel="predicted", title=f"{label}: R2 {m['r2']:.3f}")
        else:
            cm = np.array(m["confusion_matrix"])
            ax.imshow(cm, cmap="Blues")
            for (i, j), v in np.ndenumerate(cm):
                ax.text(j, i, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black")
            ax.set(xticks=range(len(names)), yticks=range(len(names)), xticklabels=names, yticklabels=names,
                   xlabel="predicted", ylabel="true",
                   title=f"{label}: acc {m['accuracy']:.3f}, MCC {m['mcc']:.3f}")
            plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    fig.suptitle(f"test split ({len(y)} sequences)")
    save_figure_atomic(fig, path)


# --- main -------------------------------------------------------------------------------------------------------
def main(cfg: FinetuneConfig) -> dict:
    import lightning as L
    from lightning.pytorch.callbacks import EarlyStopping
    out = prepare_output_dir(cfg.output_dir)
    lm, meta, _ = load_model(cfg.checkpoint, "cpu")
    data, names, source = load_data(cfg)
    n_classes = None if names is None else len(names)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    module = FinetuneModule(lm.config.to_dict(), n_classes or 1, names is None, asdict(cfg.optim), cfg.backbone_lr,
                            cfg.freeze_backbone)
    module.model.backbone.load_state_dict(lm.backbone.state_dict())

    def loader(split, shuffle):
        seqs, y = data[split]
        # Training drops a last batch of one sequence: batch norm needs two.
        return torch.utils.data.DataLoader(list(zip(seqs, y)), batch_size=cfg.batch_size, shuffle=shuffle,
                                           collate_fn=collate, num_workers=cfg.num_workers,
                                           drop_last=shuffle and len(y) % cfg.batch_size == 1,
                                           generator=torch.Generator().manual_seed(cfg.seed))
    probe = None
    if cfg.probe_init:
        probe = probe_init_head(module.model, loader("train", False), data["train"][1], loader("valid", False),
                                data["valid"][1], names is None, cfg.seed,
                                "cuda" if resolve_accelerator(cfg) == "gpu" else "cpu")
    trainer = make_trainer(cfg, monitor="val_loss",
                           callbacks=[EarlyStopping("val_loss", patience=cfg.patience, mode="min")],
                           num_sanity_val_steps=0)
    trainer.fit(module, loader("train", True), loader("valid", False))
    best = trainer.checkpoint_callbacks[-1].best_model_path or None
    pred = torch.cat(trainer.predict(module, loader("test", False), ckpt_path=best)).numpy()
    y_test = data["test"][1]
    baseline = kmer_baseline(data, n_classes, cfg.kmer_sizes, cfg.seed)
    base_pred = baseline.pop("pred")
    res = {"source": source, "checkpoint": str(resolve_model_dir(cfg.checkpoint)),
           "task": "regression" if names is None else "classification", "classes": names,
           "n": {k: len(v[1]) for k, v in data.items()}, "seed": cfg.seed,
           "split_seeds": {"test": cfg.seed, "valid": cfg.seed + 1},
           "freeze_backbone": cfg.freeze_backbone, "probe_init": probe, "epochs_run": int(trainer.current_epoch),
           "best_epoch_checkpoint": best, "finetuned": metrics(pred, y_test, n_classes), "baseline": baseline}
    key = "r2" if names is None else "accuracy"
    res["margin_over_baseline"] = {k: res["finetuned"][k] - baseline["test"][k]
                                   for k in (("r2", "pearson") if names is None else ("accuracy", "mcc", "auroc"))}
    write_json_atomic(out / "finetune.json", res)
    shown = (lambda t, p: (f"{t:g}", f"{float(p[0]):g}")) if names is None else (
        lambda t, p: (names[int(t)], names[int(p.argmax())]))
    rows = ["index\ttrue\tpredicted"] + ["\t".join((str(i), *shown(y_test[i], pred[i]))) for i in range(len(y_test))]
    write_text_atomic(out / "predictions.tsv", "\n".join(rows) + "\n")
    plot(res, names, y_test, pred, base_pred, out / "finetune.png")
    print(f"fine-tuned {key} {res['finetuned'][key]:.3f} vs {baseline['k']}-mer baseline "
          f"{baseline['test'][key]:.3f} (margin {res['margin_over_baseline'][key]:+.3f}) on {len(y_test)} test "
          f"sequences -> {out / 'finetune.json'}")
    return res


if __name__ == "__main__":
    main_entry(main, FinetuneConfig, "python -m genomics.finetune", description=__doc__.split("\n\n")[0])
