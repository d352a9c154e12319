"""Pretrain a DNA language model on a genome.

    python -m genomics.pretrain                          # the embedded demo genome, a few minutes on a CPU
    python -m genomics.pretrain --fasta hg38.fa --config configs/genomics/hg38.yaml
    python -m genomics.pretrain --fasta hg38.fa --devices 8 --num-nodes 2 --strategy ddp
    python -m genomics.pretrain --model.d_model 128 --model.n_layer 4 --optim.lr 3e-3

Writes under --output-dir: checkpoints/{last,best}.ckpt (atomic; --resume continues mid-epoch on the same
data stream), config.yaml (the resolved configuration: `--config` of it repeats the run), model/ (config.json + model.safetensors for genomics.embed / evaluate / probe), logs/ (CSV +
TensorBoard), metrics.json and loss_curve.png.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from ssm_core import MambaConfig
from ssm_core.cli import UserError, main_entry
from ssm_core.io import save_figure_atomic, write_json_atomic
from ssm_core.training import (
    OptimConfig,
    TrainConfig,
    checkpoint_dir,
    make_trainer,
    prepare_run,
    resume_checkpoint,
    run_length,
    save_run_config,
)

from . import demo
from .data import Genome, check_lengths, make_splits
from .lightning_module import DNADataModule, DNALightningModule, model_inputs


@dataclass
class PretrainConfig(TrainConfig):
    # Defaults are the embedded demo run: a small model that learns the demo genome on a 2-core CPU in a
    # few minutes (docs/genomics.md "The embedded demo genome" has the runs that chose them). The configs in
    # configs/genomics/ have the Caduceus-size settings for a real genome on GPUs.
    output_dir: str = field(default="runs/genomics", metadata={"help": "checkpoints, logs, model, metrics"})
    max_steps: int = 1000
    batch_size: int = 4
    fasta: list[str] | None = field(default=None, metadata={
        "help": "FASTA file(s) (plain, bgzip, gzip, GenBank, EMBL); several = multi-species; none = demo genome"})
    bed: str | None = field(default=None, metadata={"help": "BED of intervals with a split column (train/valid/test)"})
    val_contigs: list[str] | None = field(default=None, metadata={
        "help": "held-out validation contigs (default chr20 when present, else the tail 5% of every contig)"})
    test_contigs: list[str] | None = field(default=None, metadata={"help": "held-out test contigs (default chr21)"})
    skip_short_records: bool = field(default=False, metadata={"help": "drop records shorter than a window"})
    max_n_frac: float = field(default=0.1, metadata={"help": "redraw windows with more N than this"})
    # On for the demo: the repeat annotation tells the model where copying (tandem repeats) pays, which a
    # few-minute run does not learn from the bases alone (docs/genomics.md). Off for a user's FASTA, which is
    # upper-cased as HyenaDNA and Caduceus do, unless asked for.
    keep_softmask: bool | None = field(default=None, metadata={
        "help": "feed soft-masking as input (lower-case ids); default: on for the demo genome, off with --fasta"})
    rc_augment: bool = field(default=False, metadata={
        "help": "reverse-complement half of the training windows (for strand-symmetric genomes: hg38 config)"})
    seq_len: int = 1024        # long windows: fewer bases scored with little context (GC drift, repeats)
    seq_len_warmup_steps: int = field(default=0, metadata={
        "help": "grow the context over this many steps (meanwhile more, shorter windows: equal bases per step)"})
    seq_len_warmup_start: int = 1024
    objective: Literal["causal", "mlm"] = field(default="causal", metadata={
        "help": "causal next-base, or masked LM (needs --model.bidirectional or --model.rc_equivariant)"})
    # Wide and shallow with expand 1 / d_state 8: at equal CPU time a wider residual stream learned the
    # repeats and motifs faster than a d_model 64, expand 2, d_state 16 model (docs/genomics.md). The
    # vocabulary (and an RC model's complement map) follow from --keep-softmask: see DERIVED.
    model: MambaConfig = field(default_factory=lambda: MambaConfig(
        d_model=96, n_layer=2, d_state=8, expand=1, **model_inputs(keep_softmask=True, rc_equivariant=False)))
    # Weight decay 0 for the demo: decay slowed the memorising of repeats.
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        lr=0.01, weight_decay=0.0, betas=(0.9, 0.95), warmup_steps=10, min_lr_ratio=0.1, grad_clip=1.0))
    val_every: int = 250
    val_batches: int = 32      # 32 x 4 x 1,024 = 131k held-out bases: repeats cluster, small samples are noisy
    ckpt_every: int = field(default=250, metadata={"help": "write checkpoints/last.ckpt every N steps"})
    cache_dir: str | None = field(default=None, metadata={"help": "indexes/conversions/demo genome (default ~/.cache)"})
    synthetic_data: bool = field(default=False, metadata={"help": "random tokens instead of the genome (benchmark)"})

    DERIVED = {"model.vocab_size": "--keep-softmask", "model.d_input": "token input (DNA)",
               "model.complement_map": "--model.rc_equivariant"}
    MOVED_FLAGS = {"lr_decay_steps": "optim.decay_steps"}

    @classmethod
    def derive(cls, values: dict) -> dict:
        keep = values.get("keep_softmask")
        keep = not values.get("fasta") if keep is None else keep
        rc = bool(values.get("model", {}).get("rc_equivariant"))
        return {f"model.{k}": v for k, v in model_inputs(keep, rc).items()}

    def __post_init__(self):
        super().__post_init__()
        if self.keep_softmask is None:
            self.keep_softmask = not self.fasta
        m = self.model
        derived = model_inputs(self.keep_softmask, m.rc_equivariant)
        if any(getattr(m, k) != v for k, v in derived.items()):
            self.model = dataclasses.replace(m, **derived)
        if self.seq_len < 2:
            raise ValueError(f"--seq-len: must be >= 2, got {self.seq_len}")
        if self.objective == "mlm" and not (m.bidirectional or m.rc_equivariant):
            raise ValueError("--objective mlm: needs a model that sees both sides (--model.bidirectional or "
                             "--model.rc_equivariant)")
        if self.objective == "causal" and (m.bidirectional or m.rc_equivariant):
            raise ValueError("--objective causal: a bidirectional/RC-equivariant model sees the next base; "
                             "use --objective mlm")
        if not 0.0 <= self.max_n_frac <= 1.0:
            raise ValueError(f"--max-n-frac: must be in [0, 1], got {self.max_n_frac}")
        for name in ("val_every", "val_batches", "ckpt_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(self, name)}")


def open_genome(cfg: PretrainConfig):
    """FASTA(s) -> (genome, paths, splits), every input problem raised as one UserError line."""
    paths = cfg.fasta or [str(demo.demo_genome(Path(cfg.cache_dir) / f"demo-v{demo.VERSION}" if cfg.cache_dir else None))]
    genome = Genome.open(paths, cfg.cache_dir)
    holdout = {}   # the hold-out rule, for metrics.json
    splits = make_splits(genome, cfg.val_contigs, cfg.test_contigs, cfg.bed, min_holdout=cfg.seq_len + 1,
                         seed=cfg.seed, info=holdout)
    splits = check_lengths(genome, splits, cfg.seq_len + 1, cfg.skip_short_records)
    if not splits.get("valid"):
        raise UserError("no validation records: give --val-contigs (or valid rows in --bed)")
    return genome, paths, splits, holdout


def plot_history(history: dict, path: Path, entropy: float | None, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    if history["train"]:
        ax.plot(*zip(*history["train"]), label="train", alpha=0.6)
    if history["valid"]:
        ax.plot(*zip(*history["valid"]), "o-", label="validation")
    if entropy is not None:
        ax.axhline(entropy, color="k", ls="--", lw=1, label=f"generator entropy {entropy:.3f}")
    ax.set(xlabel="optimizer step", ylabel="bits per base", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure_atomic(fig, path)


# What a run writes into --output-dir (and what --overwrite may remove there).
# model/: its files only, so a user's file put there survives --overwrite.
OUTPUTS = ("checkpoints", "logs", "model/config.json", "model/model.safetensors", "model/genomics.json", "config.yaml",
           "metrics.json", "loss_curve.png")


def main(cfg: PretrainConfig) -> dict:
    # The output-folder policy (ssm_core.run_dir): refuses a user's folder and an earlier run without
    # --resume/--overwrite, before any work.
    out = prepare_run(cfg, "genomics.pretrain", OUTPUTS)
    ckpt_path = resume_checkpoint(cfg)
    genome, paths, splits, holdout = open_genome(cfg)
    save_run_config(cfg, out)
    torch.manual_seed(cfg.seed)                    # the initial weights are a function of --seed
    module = DNALightningModule(cfg.model.to_dict(), dataclasses.asdict(cfg.optim), total_steps=run_length(cfg))
    dm = DNADataModule(genome, splits, cfg.batch_size, cfg.seq_len, cfg.objective, cfg.seed, cfg.max_n_frac,
                       cfg.keep_softmask, cfg.rc_augment, cfg.num_workers, cfg.max_steps, cfg.val_batches,
                       cfg.seq_len_warmup_steps, cfg.seq_len_warmup_start, cfg.synthetic_data)
    trainer = make_trainer(cfg, monitor="val_loss", every_n_train_steps=cfg.ckpt_every,
                           # validate at the last step at the latest (so best.ckpt exists for short runs)
                           val_check_interval=min(cfg.val_every, cfg.max_steps) if cfg.max_steps > 0 else cfg.val_every,
                           check_val_every_n_epoch=None,
                           limit_val_batches=cfg.val_batches, num_sanity_val_steps=0,
                           use_distributed_sampler=False)
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    trainer.save_checkpoint(checkpoint_dir(cfg) / "last.ckpt")    # the final step, whatever ckpt_every
    if module.history["valid"] and module.history["valid"][-1][0] == trainer.global_step:
        final = module.last_val
    else:
        trainer.validate(module, datamodule=dm, verbose=False)
        final = module.last_val
    train_tokens = int(module.train_tokens.compute())   # a collective under DDP: every rank calls it
    if not trainer.is_global_zero:
        return {}
    held_out = [genome.contigs[i].name for i, _, _ in splits["valid"]]
    entropy = demo.known_entropy(paths[0], held_out) if not cfg.fasta else None
    model = module.model
    model.save_pretrained(out / "model")
    write_json_atomic(out / "model" / "genomics.json", {
        "objective": cfg.objective, "seq_len": cfg.seq_len, "keep_softmask": cfg.keep_softmask,
        "fasta": [str(p) for p in paths], "val_contigs": held_out, "tokenizer": "hyenadna-char"})
    tps = module.tokens_per_second()
    metrics = {
        **final,
        "train_tokens": train_tokens,
        "tokens_per_second": None if math.isnan(tps) else tps,
        "global_step": int(trainer.global_step),
        "world_size": int(trainer.world_size),
        # this process's GPU (rank 0): what one device needs at this batch size and context
        "peak_gpu_memory_gib": (torch.cuda.max_memory_allocated(module.device) / 2 ** 30
                                if module.device.type == "cuda" else None),
        "n_params": sum(p.numel() for p in model.parameters()),
        "objective": cfg.objective, "seq_len": cfg.seq_len, "batch_size": cfg.batch_size,
        "fasta": [str(p) for p in paths], "synthetic_data": cfg.synthetic_data, "holdout": holdout,
    }
    if entropy is not None:
        metrics["generator_bits_per_base"] = entropy
        metrics["gap_to_generator_bits"] = metrics["val_bits_per_base"] - entropy
    write_json_atomic(out / "metrics.json", metrics)
    plot_history(module.history, out / "loss_curve.png", entropy,
                 f"{'demo genome' if not cfg.fasta else Path(paths[0]).name}: {cfg.objective} LM, "
                 f"{metrics['n_params'] / 1e3:.0f}k params")
    print(f"val bits/base {metrics['val_bits_per_base']:.4f}"
          + (f" (generator entropy {entropy:.4f}, gap {metrics['gap_to_generator_bits']:+.4f})" if entropy else "")
          + f", accuracy {metrics['val_accuracy']:.3f}, {metrics['train_tokens']:,} tokens"
          + (f" at {tps:,.0f} tokens/s" if not math.isnan(tps) else "") + f" -> {out}/metrics.json")
    return metrics


if __name__ == "__main__":
    main_entry(main, PretrainConfig, "python -m genomics.pretrain", description=__doc__.split("\n\n")[0])
