"""Held-out bits per base of a pretrained DNA model at several context lengths.

    python -m genomics.evaluate --checkpoint runs/genomics                 # the FASTA it was trained on
    python -m genomics.evaluate --checkpoint runs/genomics --fasta hg38.fa --contigs chr21 --context-lengths 1024 8192

Scores random windows of the held-out contigs (the model's validation contigs by default): for a causal
model next-base bits per base over the whole window, for an MLM model bits per masked base. Writes
<output-dir>/evaluate.json and evaluate.png (bits per base against context length).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ssm_core.cli import UserError, main_entry
from ssm_core.io import save_figure_atomic, write_json_atomic
from ssm_core.training import prepare_output_dir

from . import demo
from .common import load_model
from .data import Genome, WindowSampler, causal_batch, check_lengths, mlm_batch, named_contigs
from .lightning_module import LN2, token_stats


@dataclass
class EvaluateConfig:
    checkpoint: str = field(default="runs/genomics", metadata={"help": "genomics.pretrain output folder"})
    fasta: list[str] | None = field(default=None, metadata={"help": "default: the FASTA the model was trained on"})
    contigs: list[str] | None = field(default=None, metadata={"help": "held-out contigs (default: its val contigs)"})
    context_lengths: list[int] = field(default_factory=lambda: [128, 512, 2048])
    tokens: int = field(default=65536, metadata={"help": "tokens scored per context length"})
    batch_size: int = 8
    output_dir: str | None = field(default=None, metadata={"help": "default: the checkpoint folder"})
    device: str = "auto"
    seed: int = 1234
    cache_dir: str | None = None

    def __post_init__(self):
        if not self.context_lengths or min(self.context_lengths) < 2:
            raise ValueError("--context-lengths: give one or more lengths >= 2")
        if self.tokens < 1 or self.batch_size < 1:
            raise ValueError("--tokens and --batch-size must be >= 1")


@torch.no_grad()
def bits_per_base(model, sampler: WindowSampler, L: int, n_tokens: int, batch_size: int, objective: str,
                  device: torch.device, seed: int) -> tuple[float, float, int]:
    """(bits per base, accuracy, scored tokens) over ceil(n_tokens / L) windows of length L."""
    n_windows = max(1, math.ceil(n_tokens / L))
    nll = count = correct = 0.0
    for i, start in enumerate(range(0, n_windows, batch_size)):
        ids = sampler.windows(i, min(batch_size, n_windows - start), L + 1)
        batch = mlm_batch(ids, np.random.default_rng([seed, i])) if objective == "mlm" else causal_batch(ids)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(batch["input_ids"].to(device).long())
        a, b, c = token_stats(logits, batch["targets"].to(device))
        nll, count, correct = nll + float(a), count + float(b), correct + float(c)
    return nll / max(count, 1) / LN2, correct / max(count, 1), int(count)


def main(cfg: EvaluateConfig) -> dict:
    model, meta, device = load_model(cfg.checkpoint, cfg.device)
    out = prepare_output_dir(cfg.output_dir or Path(cfg.checkpoint), "--output-dir")
    fasta = cfg.fasta or meta.get("fasta")
    if not fasta:
        raise UserError("--fasta: the checkpoint does not record its FASTA; give one")
    contigs = cfg.contigs or meta.get("val_contigs")
    if not contigs:
        raise UserError("--contigs: give the held-out contigs to score")
    genome = Genome.open(fasta, cfg.cache_dir)
    idx = named_contigs(genome, contigs, "--contigs")
    intervals = [(i, 0, genome.contigs[i].length) for i in idx]
    check_lengths(genome, {"train": intervals}, max(cfg.context_lengths) + 1, skip_short=False,
                  seq_len_flag="the longest --context-lengths")
    sampler = WindowSampler(genome, intervals, "test", cfg.seed, max_n_frac=0.1,
                            keep_softmask=bool(meta.get("keep_softmask", False)))
    objective = meta.get("objective", "causal")
    rows = []
    for L in sorted(cfg.context_lengths):
        bpb, acc, n = bits_per_base(model, sampler, L, cfg.tokens, cfg.batch_size, objective, device, cfg.seed)
        rows.append({"context_length": L, "bits_per_base": bpb, "accuracy": acc, "scored_tokens": n})
        print(f"context {L:>7}: {bpb:.4f} bits/base, accuracy {acc:.3f} ({n:,} tokens)")
    entropy = demo.known_entropy(fasta[0], contigs)
    result = {"checkpoint": str(cfg.checkpoint), "fasta": list(fasta), "contigs": list(contigs),
              "objective": objective, "results": rows, "generator_bits_per_base": entropy}
    write_json_atomic(out / "evaluate.json", result)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["context_length"] for r in rows], [r["bits_per_base"] for r in rows], "o-", label="model")
    if entropy is not None:
        ax.axhline(entropy, color="k", ls="--", lw=1, label=f"generator entropy {entropy:.3f}")
    ax.set(xscale="log", xlabel="context length (bases)", ylabel="held-out bits per base",
           title=f"{objective} LM on {', '.join(contigs)}")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure_atomic(fig, out / "evaluate.png")
    return result


if __name__ == "__main__":
    main_entry(main, EvaluateConfig, "python -m genomics.evaluate", description=__doc__.split("\n\n")[0])
