"""Does a longer context help on DNA? Same-size causal DNA models trained at contexts 1k .. 131k on the
long-range genome (genomics.demo.long_range_genome: diverged copies of segments 1k to 500k bases apart), with
equal tokens per step, scored on the held-out contig, beside the generator's own bits per base at each context.

    python -m benchmarks.dna_context --device gpu --out-dir runs/dna_context        # the docs/seeds.md table
    python -m benchmarks.dna_context --contexts 256 1024 --tokens-per-step 2048 --steps 20 --genome-scale 0.01

Each context is one `genomics.pretrain` run in <out-dir>/runs/ctx<C> (batch = --tokens-per-step / C), so the
models see the same bases per step and differ only in how far back they can look. Run again, the command
skips finished contexts and resumes an interrupted one from its checkpoint. Writes <out-dir>/dna_context.json
(per context: held-out bits per base, the generator's best at that context, tokens, seconds) and
dna_context.png, and prints a markdown table.
"""
from __future__ import annotations

import functools
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ssm_core.cli import main_entry
from ssm_core.io import save_figure_atomic, write_json_atomic


@dataclass
class ContextSweepConfig:
    contexts: list[int] = field(default_factory=lambda: [2 ** k for k in range(10, 18)])
    tokens_per_step: int = field(default=1 << 17, metadata={"help": "bases per optimizer step at every context"})
    steps: int = 400
    lr: float = 0.005
    genome_scale: float = field(default=1.0, metadata={
        "help": "contig lengths of the long-range genome times this (small for a CPU check of the code path)"})
    device: str = field(default="auto", metadata={"help": "cpu, gpu or auto (Lightning's accelerator)"})
    precision: str | None = None
    val_batches: int = field(default=0, metadata={"help": "0: enough windows for --val-tokens held-out bases"})
    val_tokens: int = 1 << 20
    out_dir: str = "runs/dna_context"
    cache_dir: str | None = field(default=None, metadata={"help": "where the genome is generated (default ~/.cache)"})

    def __post_init__(self):
        if not self.contexts or min(self.contexts) < 2:
            raise ValueError("--contexts: give one or more lengths >= 2")
        for c in self.contexts:
            if self.tokens_per_step % c:
                raise ValueError(f"--tokens-per-step {self.tokens_per_step}: not a multiple of context {c}")
        if not 0 < self.genome_scale <= 1:
            raise ValueError(f"--genome-scale: must be in (0, 1], got {self.genome_scale}")


def genome(cfg: ContextSweepConfig) -> tuple[Path, dict]:
    from genomics import demo
    contigs = {k: max(4 * max(cfg.contexts), int(v * cfg.genome_scale)) for k, v in demo.LONG_RANGE_CONTIGS.items()}
    contexts = tuple(sorted(set(cfg.contexts)))
    root = None
    if cfg.cache_dir is not None:
        import hashlib
        root = Path(cfg.cache_dir) / ("longrange-" + hashlib.sha1(json.dumps([contigs, contexts]).encode()).hexdigest()[:8])
    fasta = demo.long_range_genome(root, contigs=contigs, contexts=contexts)
    return fasta, json.loads(fasta.with_name("demo.entropy.json").read_text())


KINDS = ("background", "copy, source in view", "copy, source out of view")


def bits_by_kind(model_dir: Path, notes, contig: str, C: int, max_bases: int, device: str) -> dict:
    """Held-out bits per base of a run's model split by what the generator put there: background bases,
    copied bases whose source lies inside the window (a model that copies predicts them at the generator's
    substitution entropy), and copied bases whose source is out of view. Windows of C bases from the contig's
    start, scored as validation scores them (offset t sees t bases back); `notes` is the genome's
    demo.copies.npz."""
    import math

    import numpy as np
    import torch

    from genomics.tokenizer import BASES
    from ssm_core.model import from_pretrained
    model = from_pretrained(model_dir, map_location=device).eval()
    ids = torch.tensor(BASES)[torch.from_numpy(notes[f"{contig}/bases"].astype(np.int64))]
    dist, ent, bg = (notes[f"{contig}/{k}"] for k in ("copy_distance", "entropy", "background_entropy"))
    sums = np.zeros((len(KINDS), 3))          # per kind: bases, the model's bits, the generator's best bits
    offset = np.arange(1, C)
    with torch.no_grad():
        for s in range(0, max(1, min(len(ids), max_bases) // C) * C, C):
            x = ids[s:s + C][None].to(device)
            logp = torch.log_softmax(model(x)[0, :-1].float(), -1)
            bits = (-logp.gather(-1, x[0, 1:, None])[:, 0] / math.log(2)).cpu().numpy()
            d = dist[s + 1:s + C]
            kind = np.where(d == 0, 0, np.where(d <= offset, 1, 2))
            best = np.where(kind == 1, ent[s + 1:s + C], bg[s + 1:s + C])
            for k in range(len(KINDS)):
                m = kind == k
                sums[k] += (m.sum(), bits[m].sum(), best[m].sum())
    return {label: {"bases": int(n), "model_bits": b / n if n else None, "generator_best_bits": g / n if n else None}
            for label, (n, b, g) in zip(KINDS, sums)}


def run_context(cfg: ContextSweepConfig, fasta: Path, C: int) -> dict:
    from genomics.pretrain import PretrainConfig
    from genomics.pretrain import main as pretrain
    out = Path(cfg.out_dir) / "runs" / f"ctx{C}"
    if (out / "metrics.json").is_file():
        metrics = json.loads((out / "metrics.json").read_text())
        if "bits_by_kind" not in metrics:        # a run finished before the breakdown existed
            metrics["bits_by_kind"] = breakdown(cfg, fasta, out, C)
            write_json_atomic(out / "metrics.json", metrics)
        return metrics
    resume = any(out.glob("**/last.ckpt"))
    batch = cfg.tokens_per_step // C
    val_batches = cfg.val_batches or max(1, cfg.val_tokens // cfg.tokens_per_step)
    from ssm_core.training import OptimConfig
    pcfg = PretrainConfig(fasta=[str(fasta)], seq_len=C, batch_size=batch, max_steps=cfg.steps, output_dir=str(out),
                          accelerator=cfg.device, precision=cfg.precision, val_every=cfg.steps,
                          val_batches=val_batches, ckpt_every=max(1, cfg.steps // 4), resume=resume,
                          overwrite=out.exists() and not resume, keep_softmask=False, val_contigs=["chr20"],
                          test_contigs=["chr21"],
                          optim=OptimConfig(lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.95), warmup_steps=10,
                                            min_lr_ratio=0.1, grad_clip=1.0))
    t0 = time.perf_counter()
    metrics = pretrain(pcfg)
    metrics["wall_seconds"] = round(time.perf_counter() - t0, 1)
    metrics["bits_by_kind"] = breakdown(cfg, fasta, out, C)
    write_json_atomic(out / "metrics.json", metrics)
    return metrics


def breakdown(cfg: ContextSweepConfig, fasta: Path, out: Path, C: int) -> dict:
    import torch
    device = "cuda" if cfg.device in ("gpu", "auto") and torch.cuda.is_available() else "cpu"
    return bits_by_kind(out / "model", held_out_annotation(fasta), "chr20", C, cfg.val_tokens, device)


@functools.lru_cache(maxsize=1)
def held_out_annotation(fasta: Path) -> dict:
    """The genome's demo.copies.npz, decompressed once for every context of the sweep."""
    import numpy as np

    from genomics.demo import LONG_RANGE_ANNOTATION
    with np.load(fasta.with_name(LONG_RANGE_ANNOTATION)) as notes:
        return {k: notes[k] for k in notes.files}


def main(cfg: ContextSweepConfig) -> dict:
    fasta, ent = genome(cfg)
    rows = []
    for C in cfg.contexts:
        m = run_context(cfg, fasta, C)
        rows.append({"context": C, "batch_size": cfg.tokens_per_step // C, "val_bits_per_base": m["val_bits_per_base"],
                     "generator_best_in_windows": ent["bits_per_base_in_windows"]["chr20"][str(C)],
                     "generator_best_full_context": ent["bits_per_base_at_context"]["chr20"][str(C)],
                     "train_tokens": m["train_tokens"], "tokens_per_second": m.get("tokens_per_second"),
                     "peak_gpu_memory_gib": m.get("peak_gpu_memory_gib"), "n_params": m["n_params"],
                     "bits_by_kind": m["bits_by_kind"]})
        print(f"context {C:>7}: held-out {rows[-1]['val_bits_per_base']:.4f} bits/base "
              f"(generator's best in windows of {C}: {rows[-1]['generator_best_in_windows']:.4f})", flush=True)
    h = ent["bits_per_base"]["chr20"]
    out = Path(cfg.out_dir)
    write_json_atomic(out / "dna_context.json", {"config": vars(cfg), "generator_bits_per_base": h, "rows": rows,
                                                 "genome": {k: v for k, v in ent.items() if k != "definition"}})
    print(f"\nheld-out chr20 of the long-range genome (generator entropy {h:.4f} bits/base), "
          f"{cfg.tokens_per_step:,} bases per step, {cfg.steps} steps\n")
    print("| context | batch | held-out bits/base | gap to generator | generator's best in windows | background "
          "bases: model / best | copies, source in view: model / best (share of bases) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        bg, cv = r["bits_by_kind"][KINDS[0]], r["bits_by_kind"][KINDS[1]]
        n = sum(k["bases"] for k in r["bits_by_kind"].values())
        copies = (f"{cv['model_bits']:.3f} / {cv['generator_best_bits']:.3f} ({cv['bases'] / n:.1%})"
                  if cv["bases"] else "none in view")
        print(f"| {r['context']:,} | {r['batch_size']} | {r['val_bits_per_base']:.4f} | "
              f"{r['val_bits_per_base'] - h:+.4f} | {r['generator_best_in_windows']:.4f} | "
              f"{bg['model_bits']:.3f} / {bg['generator_best_bits']:.3f} | {copies} |")
    plot(rows, h, out / "dna_context.png")
    return {"rows": rows, "generator_bits_per_base": h}


def plot(rows: list[dict], entropy: float, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.8))
    c = [r["context"] for r in rows]
    ax.plot(c, [r["val_bits_per_base"] for r in rows], marker="o", label="Mamba, held-out")
    ax.plot(c, [r["generator_best_in_windows"] for r in rows], ls="--", color="gray",
            label="generator's best in windows of this context")
    ax.axhline(entropy, color="black", lw=1, ls=":", label="generator entropy (all copies in view)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("training / evaluation context (bases)")
    ax.set_ylabel("bits per base")
    ax.set_title("long-range genome: equal tokens per step at every context")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure_atomic(fig, path)


if __name__ == "__main__":
    main_entry(main, ContextSweepConfig, "python -m benchmarks.dna_context")
