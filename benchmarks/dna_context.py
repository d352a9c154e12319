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


def run_context(cfg: ContextSweepConfig, fasta: Path, C: int) -> dict:
    from genomics.pretrain import PretrainConfig
    from genomics.pretrain import main as pretrain
    out = Path(cfg.out_dir) / "runs" / f"ctx{C}"
    if (out / "metrics.json").is_file():
        return json.loads((out / "metrics.json").read_text())
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
    write_json_atomic(out / "metrics.json", metrics)
    return metrics


def main(cfg: ContextSweepConfig) -> dict:
    fasta, ent = genome(cfg)
    rows = []
    for C in cfg.contexts:
        m = run_context(cfg, fasta, C)
        rows.append({"context": C, "batch_size": cfg.tokens_per_step // C, "val_bits_per_base": m["val_bits_per_base"],
                     "generator_best_in_windows": ent["bits_per_base_in_windows"]["chr20"][str(C)],
                     "generator_best_full_context": ent["bits_per_base_at_context"]["chr20"][str(C)],
                     "train_tokens": m["train_tokens"], "tokens_per_second": m.get("tokens_per_second"),
                     "peak_gpu_memory_gib": m.get("peak_gpu_memory_gib"), "n_params": m["n_params"]})
        print(f"context {C:>7}: held-out {rows[-1]['val_bits_per_base']:.4f} bits/base "
              f"(generator's best in windows of {C}: {rows[-1]['generator_best_in_windows']:.4f})", flush=True)
    h = ent["bits_per_base"]["chr20"]
    out = Path(cfg.out_dir)
    write_json_atomic(out / "dna_context.json", {"config": vars(cfg), "generator_bits_per_base": h, "rows": rows,
                                                 "genome": {k: v for k, v in ent.items() if k != "definition"}})
    print(f"\nheld-out chr20 of the long-range genome (generator entropy {h:.4f} bits/base), "
          f"{cfg.tokens_per_step:,} bases per step, {cfg.steps} steps\n")
    print("| context | batch | held-out bits/base | gap to generator | generator's best in windows |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['context']:,} | {r['batch_size']} | {r['val_bits_per_base']:.4f} | "
              f"{r['val_bits_per_base'] - h:+.4f} | {r['generator_best_in_windows']:.4f} |")
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
