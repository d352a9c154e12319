"""Held-out bits per base of a pretrained DNA model at several context lengths.

    python -m genomics.evaluate --checkpoint runs/genomics                 # the FASTA it was trained on
    python -m genomics.evaluate --checkpoint runs/genomics --fasta hg38.fa --contigs chr21 --context-lengths 1024 8192

    python -m genomics.evaluate --checkpoint runs/genomics --stream                 # every base, full left context

Scores random windows of the held-out contigs (the model's validation contigs by default): for a causal
model next-base bits per base over the whole window, for an MLM model bits per masked base. Writes
<output-dir>/evaluate.json and evaluate.png (bits per base against context length).

--stream (causal models) scores every base of each contig instead, in one pass that carries the model's
state across chunks of --chunk bases (`MambaModel.stream`): each base is predicted from the whole contig to its
left, in memory that does not grow with the contig, and the result equals a single window covering the
whole contig. evaluate.json then has per-contig bits per base, tokens/s and peak memory; evaluate_stream.png
shows bits per base along each contig.
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
from .common import check_streamable, genome_chunks, load_model, peak_memory_gib, stream_hidden
from .data import Genome, WindowSampler, causal_batch, check_lengths, mlm_batch, named_contigs, target_ids
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
    stream: bool = field(default=False, metadata={"help": "score whole contigs with the state carried across chunks"})
    chunk: int = field(default=65536, metadata={"help": "--stream: bases per forward pass"})
    stream_bases: int | None = field(default=None, metadata={"help": "--stream: only the first N bases of each contig"})

    def __post_init__(self):
        if self.chunk < 1 or (self.stream_bases is not None and self.stream_bases < 2):
            raise ValueError("--chunk must be >= 1 and --stream-bases >= 2")
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


@torch.no_grad()
def stream_bits(model, genome: Genome, contig: int, end: int, chunk: int, softmask: bool,
                device: torch.device, progress: bool = True, autocast: bool = True) -> dict:
    """Next-base bits per base of every base of contig[:end] but the first, each predicted from everything
    before it: the chunks' logits continue across chunk boundaries (the last position of one chunk
    predicts the first base of the next)."""
    import time

    from tqdm import tqdm
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    nll = count = correct = 0.0
    prev, along = None, []
    t0 = time.perf_counter()
    bar = tqdm(total=end, desc=genome.contigs[contig].name, unit="b", unit_scale=True, disable=not progress)
    pos = 0
    for ids, h in stream_hidden(model, genome_chunks(genome, contig, 0, end, chunk, softmask), device, autocast):
        logits = model.logits(h)
        tgt = torch.from_numpy(target_ids(ids)).to(device)
        pred = logits[:-1] if prev is None else torch.cat([prev, logits[:-1]])
        a, b, c = token_stats(pred, tgt[1:] if prev is None else tgt)
        prev = logits[-1:]
        nll, count, correct = nll + float(a), count + float(b), correct + float(c)
        if float(b):
            along.append((pos + len(ids) / 2, float(a) / float(b) / LN2))
        pos += len(ids)
        bar.update(len(ids))
    bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    return {"contig": genome.contigs[contig].name, "bases": end, "scored_tokens": int(count),
            "bits_per_base": nll / max(count, 1) / LN2, "accuracy": correct / max(count, 1),
            "tokens_per_second": end / seconds, "seconds": seconds, "chunk": chunk,
            "peak_memory_gib": peak_memory_gib(device), "along": along}


def plot_stream(rows: list[dict], path: Path, entropy: float | None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4))
    for r in rows:
        if r["along"]:
            x, y = zip(*r["along"])
            ax.plot(np.array(x) / 1e6, y, ".-", lw=0.8, ms=3, label=f"{r['contig']}: {r['bits_per_base']:.4f}")
    if entropy is not None:
        ax.axhline(entropy, color="k", ls="--", lw=1, label=f"generator entropy {entropy:.3f}")
    ax.set(xlabel="position (Mb)", ylabel="bits per base (per chunk)", title="streamed, full left context")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure_atomic(fig, path)


def main_stream(cfg: EvaluateConfig, model, meta: dict, device, out: Path, fasta: list[str], genome: Genome,
                contigs: list[str], idx: list[int]) -> dict:
    check_streamable(model)
    if meta.get("objective", "causal") != "causal":
        raise UserError("--stream: needs a causal model (next-base objective)")
    softmask = bool(meta.get("keep_softmask", False))
    rows = []
    for i in idx:
        end = genome.contigs[i].length if cfg.stream_bases is None else min(cfg.stream_bases, genome.contigs[i].length)
        r = stream_bits(model, genome, i, end, cfg.chunk, softmask, device)
        rows.append(r)
        print(f"{r['contig']}: {r['bits_per_base']:.4f} bits/base, accuracy {r['accuracy']:.3f} over "
              f"{r['scored_tokens']:,} bases at {r['tokens_per_second']:,.0f} bases/s, peak memory "
              f"{r['peak_memory_gib']:.2f} GiB")
    entropy = demo.known_entropy(fasta[0], contigs) if cfg.stream_bases is None else None
    total = sum(r["scored_tokens"] for r in rows)
    result = {"checkpoint": str(cfg.checkpoint), "fasta": list(fasta), "contigs": list(contigs), "mode": "stream",
              "objective": "causal", "chunk": cfg.chunk, "stream": rows,
              "bits_per_base": sum(r["bits_per_base"] * r["scored_tokens"] for r in rows) / max(total, 1),
              "generator_bits_per_base": entropy}
    write_json_atomic(out / "evaluate.json", result)
    plot_stream(rows, out / "evaluate_stream.png", entropy)
    return result


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
    if cfg.stream:
        return main_stream(cfg, model, meta, device, out, fasta, genome, contigs, idx)
    intervals = [(i, 0, genome.contigs[i].length) for i in idx]
    check_lengths(genome, {"train": intervals}, max(cfg.context_lengths) + 1, skip_short=False,
                  seq_len_flag="--context-lengths", skip_flag=None)
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
