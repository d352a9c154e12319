"""Does a longer context help on DNA? Same-size causal DNA models trained at contexts 1k .. 131k, with equal
tokens per step, scored on a held-out contig, beside the best any predictor can do at each context.

    python -m benchmarks.dna_context --device gpu --out-dir runs/dna_context        # the docs/seeds.md table
    python -m benchmarks.dna_context --contexts 256 1024 --tokens-per-step 2048 --steps 20 --genome-scale 0.01
    python -m benchmarks.dna_context --device gpu --fasta hg38.fa --out-dir runs/dna_context_hg38   # a real genome

Two generated genomes (--genome), both from genomics.demo:
  * regional (default): regions of 131k-1M bases, each an order-2 chain with its own table (--regions.*), so
    reading more of a region pays at every base; a few hundred counts to carry, which a recurrent state
    can hold (docs/seeds.md section 4b).
  * copies: diverged copies of 500-base segments 1k to 500k bases apart, which need the span's bases
    themselves (docs/seeds.md section 4a: no fixed-size state can hold them).
Or a real genome (--fasta, as genomics.pretrain takes it: the paper's claim is on HG38): the same sweep, held
out by genomics.pretrain's rule (chr20 / chr21 when present, else --val-contigs / --test-contigs or the tail
of every contig), without the generator's columns, which only a generated genome has.
Each context is one `genomics.pretrain` run in <out-dir>/runs/ctx<C> (batch = --tokens-per-step / C), so the
models see the same bases per step and differ only in how far back they can look. Run again, the command
skips finished contexts and resumes an interrupted one from its checkpoint. Writes <out-dir>/dna_context.json
(per context: held-out bits per base, the generator's best at that context, tokens, seconds, and a breakdown:
by kind of base for `copies`, by offset in the window for `regional`) and dna_context.png, and prints a
markdown table.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from genomics.demo import LONG_RANGE_ANNOTATION, REGIONAL_ANNOTATION, Regions
from genomics.pretrain import PretrainConfig
from ssm_core.cli import main_entry
from ssm_core.errors import UserError
from ssm_core.io import save_figure_atomic, write_json_atomic
from ssm_core.model import MambaConfig

GENOMES = ("regional", "copies")


@dataclass
class ContextSweepConfig:
    contexts: list[int] = field(default_factory=lambda: [2 ** k for k in range(10, 18)])
    tokens_per_step: int = field(default=1 << 17, metadata={"help": "bases per optimizer step at every context"})
    steps: int = 400
    lr: float = 0.005
    seed: int = field(default=0, metadata={"help": "every context's --seed (initial weights, window order)"})
    genome: str = field(default="regional", metadata={"help": "regional or copies (see the module's docstring)"})
    fasta: list[str] | None = field(default=None, metadata={
        "help": "a real genome's FASTA file(s) instead of a generated genome (--genome and its options unused)"})
    val_contigs: list[str] | None = field(default=None, metadata={
        "help": "with --fasta: held-out contigs scored (genomics.pretrain's default: chr20 when present)"})
    test_contigs: list[str] | None = field(default=None, metadata={"help": "with --fasta: test contigs, never read"})
    seq_len_warmup: float = field(default=0.5, metadata={
        "help": "share of the steps over which a context above the smallest grows from the smallest (doubling, "
                "equal bases per step: genomics.pretrain --seq-len-warmup-steps); 0: none"})
    regions: Regions = field(default_factory=Regions)    # the regional genome's regions
    genome_scale: float = field(default=1.0, metadata={
        "help": "the genome's contig (and region) lengths times this (small for a CPU check of the code path)"})
    train_scale: float = field(default=1.0, metadata={
        "help": "the training contig (chr1) alone this many times longer: more regions, of the same lengths, to "
                "learn from (a model that sees the same regions many times fits their tables instead of learning "
                "to estimate a table in context); the held-out contigs keep their lengths (drawn afresh)"})
    # genomics.pretrain's demo model unless given (the same model at every context).
    model: MambaConfig = field(default_factory=lambda: PretrainConfig().model)
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
        if self.genome not in GENOMES:
            raise ValueError(f"--genome: expected one of {', '.join(GENOMES)}; got {self.genome!r}")
        if not 0 <= self.seq_len_warmup < 1:
            raise ValueError(f"--seq-len-warmup: must be in [0, 1), got {self.seq_len_warmup}")
        if not 0 < self.genome_scale <= 1:
            raise ValueError(f"--genome-scale: must be in (0, 1], got {self.genome_scale}")
        if not 1 <= self.train_scale <= 16:
            raise ValueError(f"--train-scale: must be in [1, 16], got {self.train_scale}")
        if (self.val_contigs or self.test_contigs) and not self.fasta:
            raise ValueError("--val-contigs / --test-contigs: only with --fasta (a generated genome holds out chr20 / chr21)")


def genome(cfg: ContextSweepConfig) -> tuple[list[Path], dict | None]:
    """The sweep's FASTA file(s) and, for a generated genome, its entropy file's curves (None for --fasta)."""
    if cfg.fasta:
        from genomics.data import Genome
        Genome.open(cfg.fasta)     # bad files fail here, before any run folder is made (the index is cached)
        return [Path(f) for f in cfg.fasta], None
    from genomics import demo
    base = demo.REGIONAL_CONTIGS if cfg.genome == "regional" else demo.LONG_RANGE_CONTIGS
    contigs = {k: max(4 * max(cfg.contexts), int(v * cfg.genome_scale * (cfg.train_scale if k == "chr1" else 1)))
               for k, v in base.items()}
    contexts = tuple(sorted(set(cfg.contexts)))
    key = [contigs, contexts]
    if cfg.genome == "regional":
        lengths = tuple(max(256, int(n * cfg.genome_scale)) for n in cfg.regions.lengths)
        key.append(dataclasses.replace(cfg.regions, lengths=lengths))
    root = None
    if cfg.cache_dir is not None:
        import hashlib
        tag = json.dumps(key, default=dataclasses.asdict)
        root = Path(cfg.cache_dir) / (f"{cfg.genome}-" + hashlib.sha1(tag.encode()).hexdigest()[:8])
    make = demo.regional_genome if cfg.genome == "regional" else demo.long_range_genome
    fasta = make(root, *key)
    return [fasta], json.loads(fasta.with_name("demo.entropy.json").read_text())


KINDS = ("background", "copy, source in view", "copy, source out of view")


def window_bits(model_dir: Path, bases, C: int, max_bases: int, device: str):
    """A run's model on consecutive windows of C bases from the start of a held-out contig (bases 0..3),
    scored as validation scores them (offset t sees t bases back): (bits of every scored base, its position
    in the contig), offsets 1..C-1 of each window."""
    import math

    import numpy as np
    import torch

    from genomics.tokenizer import BASES
    from ssm_core.model import from_pretrained
    model = from_pretrained(model_dir, map_location=device).to(device).eval()
    ids = torch.tensor(BASES)[torch.from_numpy(bases.astype(np.int64))]
    bits, where = [], []
    with torch.no_grad():
        for s in range(0, max(1, min(len(ids), max_bases) // C) * C, C):
            x = ids[s:s + C][None].to(device)
            logp = torch.log_softmax(model(x)[0, :-1].float(), -1)
            bits.append((-logp.gather(-1, x[0, 1:, None])[:, 0] / math.log(2)).cpu().numpy())
            where.append(np.arange(s + 1, s + C))
    return np.concatenate(bits), np.concatenate(where)


def summed(groups: dict, model_bits, best_bits) -> dict:
    """Per named boolean mask: bases, the model's mean bits and the generator's best mean bits there."""
    out = {}
    for label, m in groups.items():
        n = int(m.sum())
        out[label] = {"bases": n, "model_bits": float(model_bits[m].mean()) if n else None,
                      "generator_best_bits": float(best_bits[m].mean()) if n else None}
    return out


def bits_by_kind(model_dir: Path, notes, contig: str, C: int, max_bases: int, device: str) -> dict:
    """The copies genome: held-out bits per base of a run's model split by what the generator put there:
    background bases, copied bases whose source lies inside the window (a model that copies predicts them at
    the generator's substitution entropy), and copied bases whose source is out of view. `notes` is the
    genome's demo.copies.npz."""
    import numpy as np
    bits, pos = window_bits(model_dir, notes[f"{contig}/bases"], C, max_bases, device)
    dist, ent, bg = (notes[f"{contig}/{k}"][pos] for k in ("copy_distance", "entropy", "background_entropy"))
    offset = pos % C
    kind = np.where(dist == 0, 0, np.where(dist <= offset, 1, 2))
    best = np.where(kind == 1, ent, bg)
    return summed({label: kind == k for k, label in enumerate(KINDS)}, bits, best)


def bits_by_offset(model_dir: Path, notes, contig: str, C: int, max_bases: int, device: str) -> dict:
    """The regional genome: held-out bits per base of a run's model by how far into its window a base is
    (`by_offset`: offsets 1-3, 4-15, 16-63, ...: how much of the region it has read), beside the Bayes
    predictor on the same bases (genomics.demo.regional_best_bits); "all" is every scored base. `notes` is
    the genome's demo.regions.npz."""
    from genomics.demo import regional_best_bits
    bases, region = notes[f"{contig}/bases"], notes[f"{contig}/region"]
    bits, pos = window_bits(model_dir, bases, C, max_bases, device)
    best = regional_best_bits(bases, region, C, order=int(notes["order"]), alpha=float(notes["alpha"]))[pos]
    offset = pos % C
    edges = [1] + [4 ** k for k in range(1, 10) if 4 ** k < C] + [C]
    bins = summed({(a, b - 1): (offset >= a) & (offset < b) for a, b in zip(edges, edges[1:])}, bits, best)
    return {"all": summed({"all": offset > 0}, bits, best)["all"],
            "by_offset": [{"offsets": list(k), **v} for k, v in bins.items()]}


# Each genome's breakdown of the held-out bits: (key in metrics.json, function, annotation file).
BREAKDOWNS = {"copies": ("bits_by_kind", bits_by_kind, LONG_RANGE_ANNOTATION),
              "regional": ("bits_by_offset", bits_by_offset, REGIONAL_ANNOTATION)}


def breakdown_key(cfg: ContextSweepConfig) -> str | None:
    """The breakdown's key in metrics.json; None for a real genome, which has no generator to compare with."""
    return None if cfg.fasta else BREAKDOWNS[cfg.genome][0]


def run_context(cfg: ContextSweepConfig, fasta: list[Path], C: int) -> dict:
    from genomics.pretrain import main as pretrain
    from ssm_core.training import OptimConfig
    key = breakdown_key(cfg)
    out = Path(cfg.out_dir) / "runs" / f"ctx{C}"
    if (out / "metrics.json").is_file():
        metrics = json.loads((out / "metrics.json").read_text())
        # A finished run counts only if it is this sweep's: same genome, same model, same seed.
        run = yaml.safe_load((out / "config.yaml").read_text())
        if run["fasta"] != [str(f) for f in fasta]:
            raise UserError(f"--out-dir {cfg.out_dir}: {out.name} was trained on {', '.join(run['fasta'])}, not on "
                            f"this sweep's genome ({', '.join(map(str, fasta))}); give another --out-dir")
        ours = json.loads(json.dumps(dataclasses.asdict(cfg.model)))
        differ = ", ".join(f"--model.{k} {v}" for k, v in sorted(run["model"].items()) if k in ours and ours[k] != v)
        if run.get("seed", 0) != cfg.seed:
            differ = ", ".join(filter(None, [differ, f"--seed {run.get('seed', 0)}"]))
        if differ:
            raise UserError(f"--out-dir {cfg.out_dir}: {out.name} was trained with other settings ({differ}); "
                            "give another --out-dir")
        if key is not None and key not in metrics:        # a run finished before the breakdown existed
            metrics[key] = breakdown(cfg, fasta[0], out, C)
            write_json_atomic(out / "metrics.json", metrics)
        return metrics
    resume = any(out.glob("**/last.ckpt"))
    batch = cfg.tokens_per_step // C
    val_batches = cfg.val_batches or max(1, cfg.val_tokens // cfg.tokens_per_step)
    pcfg = PretrainConfig(fasta=[str(f) for f in fasta], seq_len=C, batch_size=batch, max_steps=cfg.steps, output_dir=str(out),
                          seed=cfg.seed, accelerator=cfg.device, precision=cfg.precision, val_every=cfg.steps,
                          val_batches=val_batches, ckpt_every=max(1, cfg.steps // 4), resume=resume,
                          overwrite=out.exists() and not resume, keep_softmask=False,
                          val_contigs=cfg.val_contigs if cfg.fasta else ["chr20"],
                          test_contigs=cfg.test_contigs if cfg.fasta else ["chr21"], model=cfg.model,
                          seq_len_warmup_steps=int(cfg.seq_len_warmup * cfg.steps), seq_len_warmup_start=min(cfg.contexts),
                          optim=OptimConfig(lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.95), warmup_steps=10,
                                            min_lr_ratio=0.1, grad_clip=1.0))
    t0 = time.perf_counter()
    metrics = pretrain(pcfg)
    metrics["wall_seconds"] = round(time.perf_counter() - t0, 1)
    if key is not None:
        metrics[key] = breakdown(cfg, fasta[0], out, C)
    write_json_atomic(out / "metrics.json", metrics)
    return metrics


def breakdown(cfg: ContextSweepConfig, fasta: Path, out: Path, C: int) -> dict:
    import torch
    device = "cuda" if cfg.device in ("gpu", "auto") and torch.cuda.is_available() else "cpu"
    _, split, notes = BREAKDOWNS[cfg.genome]
    return split(out / "model", held_out_annotation(fasta.with_name(notes)), "chr20", C, cfg.val_tokens, device)


@functools.lru_cache(maxsize=1)
def held_out_annotation(path: Path) -> dict:
    """A genome's per-base annotation of its held-out contigs, decompressed once for every context."""
    import numpy as np
    with np.load(path) as notes:
        return {k: notes[k] for k in notes.files}


def main(cfg: ContextSweepConfig) -> dict:
    fasta, ent = genome(cfg)
    key = breakdown_key(cfg)
    rows, holdout = [], {}
    for C in cfg.contexts:
        m = run_context(cfg, fasta, C)
        holdout = m.get("holdout", holdout)
        row = {"context": C, "batch_size": cfg.tokens_per_step // C, "val_bits_per_base": m["val_bits_per_base"],
               "train_tokens": m["train_tokens"], "tokens_per_second": m.get("tokens_per_second"),
               "peak_gpu_memory_gib": m.get("peak_gpu_memory_gib"), "n_params": m["n_params"]}
        best = ""
        if ent is not None:
            row.update({"generator_best_in_windows": ent["bits_per_base_in_windows"]["chr20"][str(C)],
                        "generator_best_full_context": ent["bits_per_base_at_context"]["chr20"][str(C)], key: m[key]})
            best = f" (generator's best in windows of {C}: {row['generator_best_in_windows']:.4f})"
        rows.append(row)
        print(f"context {C:>7}: held-out {row['val_bits_per_base']:.4f} bits/base{best}", flush=True)
    h = None if ent is None else ent["bits_per_base"]["chr20"]
    out = Path(cfg.out_dir)
    about = ({k: v for k, v in ent.items() if k != "definition"} if ent is not None
             else {"fasta": [str(f) for f in fasta], "holdout": holdout})
    write_json_atomic(out / "dna_context.json", {"config": dataclasses.asdict(cfg), "generator_bits_per_base": h,
                                                 "rows": rows, "genome": about})
    if ent is None:
        name = ", ".join(f.name for f in fasta)
        print(f"\nheld-out {', '.join(holdout.get('val_contigs') or ['tail of every contig'])} of {name}, "
              f"{cfg.tokens_per_step:,} bases per step, {cfg.steps} steps\n")
    else:
        name = f"{cfg.genome} genome"
        print(f"\nheld-out chr20 of the {name} (generator entropy {h:.4f} bits/base), "
              f"{cfg.tokens_per_step:,} bases per step, {cfg.steps} steps\n")
    print(table(rows, h, cfg.genome))
    plot(rows, h, out / "dna_context.png", cfg.genome, name)
    return {"rows": rows, "generator_bits_per_base": h}


def table(rows: list[dict], h: float | None, genome: str) -> str:
    """The sweep as markdown: validation's figure and the gap to the generator's entropy, then the breakdown
    (model / generator's best on the same bases); a real genome's (h None): the figure and the speed."""
    if h is None:
        lines = ["| context | batch | held-out bits/base | bases/s |", "|---|---|---|---|"]
        lines += [f"| {r['context']:,} | {r['batch_size']} | {r['val_bits_per_base']:.4f} | "
                  f"{r['tokens_per_second'] or 0:,.0f} |" for r in rows]
        return "\n".join(lines)
    if genome == "copies":
        head = "background bases: model / best | copies, source in view: model / best (share of bases)"
    else:
        head = "same bases: model / Bayes | last offsets of the window: model / Bayes"
    lines = [f"| context | batch | held-out bits/base | gap to generator | generator's best in windows | {head} |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if genome == "copies":
            bg, cv = r["bits_by_kind"][KINDS[0]], r["bits_by_kind"][KINDS[1]]
            n = sum(k["bases"] for k in r["bits_by_kind"].values())
            first = f"{bg['model_bits']:.3f} / {bg['generator_best_bits']:.3f}"
            second = (f"{cv['model_bits']:.3f} / {cv['generator_best_bits']:.3f} ({cv['bases'] / n:.1%})"
                      if cv["bases"] else "none in view")
        else:
            every, last = r["bits_by_offset"]["all"], r["bits_by_offset"]["by_offset"][-1]
            first = f"{every['model_bits']:.3f} / {every['generator_best_bits']:.3f}"
            second = (f"{last['model_bits']:.3f} / {last['generator_best_bits']:.3f} "
                      f"(offsets {last['offsets'][0]:,}-{last['offsets'][1]:,})")
        lines.append(f"| {r['context']:,} | {r['batch_size']} | {r['val_bits_per_base']:.4f} | "
                     f"{r['val_bits_per_base'] - h:+.4f} | {r['generator_best_in_windows']:.4f} | {first} | {second} |")
    return "\n".join(lines)


def plot(rows: list[dict], entropy: float | None, path: Path, genome: str, name: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.8))
    c = [r["context"] for r in rows]
    ax.plot(c, [r["val_bits_per_base"] for r in rows], marker="o", label="Mamba, held-out")
    if entropy is not None:
        ax.plot(c, [r["generator_best_in_windows"] for r in rows], ls="--", color="gray",
                label="generator's best in windows of this context")
        ax.axhline(entropy, color="black", lw=1, ls=":", label="generator entropy ("
                   + ("all copies in view)" if genome == "copies" else "region's table known)"))
    ax.set_xscale("log", base=2)
    ax.set_xlabel("training / evaluation context (bases)")
    ax.set_ylabel("bits per base")
    ax.set_title(f"{name}: equal tokens per step at every context")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure_atomic(fig, path)


if __name__ == "__main__":
    main_entry(main, ContextSweepConfig, "python -m benchmarks.dna_context")
