"""Zero-shot variant effect scores from a pretrained DNA model: one log-likelihood ratio per VCF record.

    python -m genomics.score --checkpoint runs/genomics --fasta ref.fa --vcf variants.vcf.gz --output scores.tsv
    python -m genomics.score --checkpoint runs/genomics     # demo: variants planted in the demo genome, AUROC

Each SNV or small indel is scored in a window of --context-length bases centred on it, the reference window
against the same window with the ALT allele (natural log, nats; negative = the model finds ALT less likely):
  * causal model: log P(alt window) - log P(ref window), i.e. the summed log-likelihoods of every position
    from the variant to the window's end (the positions before it are the same in both and cancel);
  * MLM / bidirectional model: log p(ALT) - log p(REF) at the variant's position, masked (SNVs only);
  * --both-strands (the default for RC-equivariant models): the same on the reverse complement, averaged.
The VCF is read with pysam (plain or bgzipped). Records that cannot be scored get an empty score and a
note, never a silent wrong one: contig not in the FASTA (a `chr` prefix is added or dropped when that
matches, with a note), REF that disagrees with the FASTA, multi-allelic, symbolic or non-ACGT alleles,
indels longer than a quarter of the window. Writes the TSV (chrom, pos, id, ref, alt, score, note)
atomically; the demo also writes demo_variants.vcf, score.json (AUROC of motif-breaking vs background
variants) and score_roc.png beside it.
"""
from __future__ import annotations

import gzip
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ssm_core.cli import UserError, main_entry
from ssm_core.io import save_figure_atomic, write_json_atomic, write_text_atomic
from ssm_core.training import prepare_output_dir

from . import demo
from . import tokenizer as tok
from .common import load_model
from .data import Genome, sniff, target_ids

_ACGT = frozenset("ACGT")


@dataclass
class ScoreConfig:
    checkpoint: str = field(default="runs/genomics", metadata={"help": "genomics.pretrain output or a model folder"})
    fasta: list[str] | None = field(default=None, metadata={"help": "reference FASTA (with --vcf)"})
    vcf: str | None = field(default=None, metadata={
        "help": "VCF / VCF.gz of SNVs and small indels; without --vcf and --fasta: planted demo variants"})
    output: str = field(default="scores.tsv", metadata={"help": "TSV of scores (chrom pos id ref alt score note)"})
    context_length: int = field(default=1024, metadata={"help": "bases in the window around each variant"})
    both_strands: bool | None = field(default=None, metadata={
        "help": "average with the reverse-complement strand (default: on for RC-equivariant models)"})
    batch_size: int = 16
    device: str = "auto"
    seed: int = field(default=0, metadata={"help": "which demo variants are planted"})
    cache_dir: str | None = None

    def __post_init__(self):
        if self.context_length < 8:
            raise ValueError(f"--context-length: must be >= 8, got {self.context_length}")
        if self.batch_size < 1:
            raise ValueError("--batch-size: must be >= 1")
        if (self.vcf is None) != (self.fasta is None):
            raise ValueError("--vcf and --fasta go together (give neither for the demo)")


@dataclass
class Variant:
    chrom: str
    pos: int               # 1-based, as in the VCF
    id: str
    ref: str
    alts: tuple[str, ...]
    score: float | None = None
    note: str = ""


# --- reading and checking records -------------------------------------------------------------------------
def read_vcf(path: str) -> list[Variant]:
    """Every record of a VCF (plain or bgzip) as a Variant; a malformed file is one UserError line."""
    import pysam
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--vcf {path}: no such file")
    verbosity = pysam.set_verbosity(0)     # htslib's own warnings would print lines beside ours
    out = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            if sniff(p) == "gzip":   # plain gzip (not bgzip): htslib cannot read it, so decompress first
                plain = Path(tmp) / "variants.vcf"
                with gzip.open(p, "rb") as src, open(plain, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                p = plain
            with pysam.VariantFile(str(p)) as vf:
                for rec in vf:
                    out.append(Variant(rec.chrom, int(rec.pos), rec.id or ".", rec.ref or "", tuple(rec.alts or ())))
    except (ValueError, OSError, EOFError, NotImplementedError) as e:
        where = f" after record {len(out)} ({out[-1].chrom}:{out[-1].pos})" if out else ""
        raise UserError(f"--vcf {path}: not a readable VCF{where} ({str(e).splitlines()[0] or type(e).__name__})") from None
    finally:
        pysam.set_verbosity(verbosity)
    if not out:
        raise UserError(f"--vcf {path}: no records")
    return out


def contig_matcher(genome: Genome):
    """name -> (contig index or None, note): exact, else with the 'chr' prefix added or dropped (chrM <-> MT)."""
    cache: dict[str, tuple[int | None, str]] = {}

    def match(name: str) -> tuple[int | None, str]:
        if name not in cache:
            bare = name[3:] if name.startswith("chr") else name
            cands = [name, bare, "chr" + bare] + (["MT", "chrMT"] if bare == "M" else ["chrM", "M"] if bare == "MT" else [])
            hit = next(((genome.index_of(c), c) for c in cands if genome.index_of(c) is not None), (None, None))
            note = "" if hit[1] in (None, name) else f"contig {name} read as {hit[1]}"
            cache[name] = (hit[0], note if hit[0] is not None else f"contig {name} not in the FASTA")
        return cache[name]
    return match


def check_record(v: Variant, genome: Genome, match, max_indel: int) -> tuple[int, str] | None:
    """(contig index, note) if the record can be scored, else None with v.note set."""
    if not v.alts:
        v.note = "no ALT allele"
        return None
    if len(v.alts) > 1:
        v.note = f"multi-allelic ({len(v.alts)} ALTs): split it first (bcftools norm -m-)"
        return None
    alt = v.alts[0]
    if alt.startswith("<") or "[" in alt or "]" in alt or alt in ("*", "."):
        v.note = f"symbolic ALT {alt}: not scored"
        return None
    if not set(v.ref.upper()) <= _ACGT or not set(alt.upper()) <= _ACGT:
        v.note = "REF/ALT with bases other than ACGT: not scored"
        return None
    if max(len(v.ref), len(alt)) > max_indel:
        v.note = f"allele longer than {max_indel} bases (a quarter of --context-length): not scored"
        return None
    i, note = match(v.chrom)
    if i is None:
        v.note = note
        return None
    n = genome.contigs[i].length
    start = v.pos - 1
    if start < 0 or start + len(v.ref) > n:
        v.note = f"position {v.pos} outside {genome.contigs[i].name} (length {n})"
        return None
    fa = genome.fetch(i, start, start + len(v.ref)).tobytes().decode("ascii", "replace")
    if fa.upper() != v.ref.upper():
        v.note = f"REF {v.ref} does not match the FASTA ({fa.upper()})"
        return None
    return i, note


# --- scoring -------------------------------------------------------------------------------------------------
def variant_windows(genome: Genome, i: int, v: Variant, L: int, softmask: bool) -> tuple[np.ndarray, np.ndarray, int]:
    """(ref window ids, alt window ids, offset of the variant in both) for a window of about L bases centred
    on the variant (clipped at the contig's ends). ALT takes the case of REF's first base (soft-masking)."""
    n = genome.contigs[i].length
    p, ref, alt = v.pos - 1, v.ref, v.alts[0]
    a = max(0, min(p - L // 2, n - L))
    b = min(n, max(a + L, p + len(ref)))
    raw = genome.fetch(i, a, b)
    s = p - a
    alt_bytes = np.frombuffer(alt.upper().encode(), dtype=np.uint8)
    if 97 <= raw[s] <= 122:
        alt_bytes = alt_bytes + 32
    alt_raw = np.concatenate([raw[:s], alt_bytes, raw[s + len(ref):]])
    return tok.encode_bytes(raw, softmask), tok.encode_bytes(alt_raw, softmask), s


@torch.no_grad()
def causal_suffix_loglik(model, seqs: list[tuple[np.ndarray, int]], device: torch.device, batch_size: int,
                         use_amp: bool) -> np.ndarray:
    """For each (ids, s): sum over positions t >= max(s, 1) of log p(ids[t] | ids[:t]), N targets left out.
    Sequences of equal length are batched together."""
    out = np.zeros(len(seqs))
    by_len: dict[int, list[int]] = {}
    for k, (ids, _) in enumerate(seqs):
        by_len.setdefault(len(ids), []).append(k)
    for length, ks in by_len.items():
        for j in range(0, len(ks), batch_size):
            part = ks[j:j + batch_size]
            x = np.stack([seqs[k][0] for k in part])
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
                logits = model(torch.from_numpy(x[:, :-1]).to(device).long())
            logp = torch.log_softmax(logits.float(), -1)
            tgt = torch.from_numpy(target_ids(x[:, 1:])).to(device)
            ll = logp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            starts = torch.tensor([max(seqs[k][1], 1) - 1 for k in part], device=device)
            keep = (tgt != tok.IGNORE_INDEX) & (torch.arange(length - 1, device=device)[None] >= starts[:, None])
            out[part] = (ll * keep).sum(1).cpu().numpy()
    return out


@torch.no_grad()
def masked_site_llr(model, items: list[tuple[np.ndarray, int, int, int]], device: torch.device, batch_size: int,
                    use_amp: bool) -> np.ndarray:
    """For each (ids, s, ref id, alt id): log p(alt) - log p(ref) at position s with s masked."""
    out = np.zeros(len(items))
    by_len: dict[int, list[int]] = {}
    for k, it in enumerate(items):
        by_len.setdefault(len(it[0]), []).append(k)
    for ks in by_len.values():
        for j in range(0, len(ks), batch_size):
            part = ks[j:j + batch_size]
            x = np.stack([items[k][0] for k in part])
            rows = np.arange(len(part))
            sites = np.array([items[k][1] for k in part])
            x[rows, sites] = tok.MASK
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
                logits = model(torch.from_numpy(x).to(device).long())
            logp = torch.log_softmax(logits.float()[torch.from_numpy(rows), torch.from_numpy(sites)], -1).cpu().numpy()
            out[part] = logp[rows, [items[k][3] for k in part]] - logp[rows, [items[k][2] for k in part]]
    return out


def score_variants(model, meta: dict, genome: Genome, variants: list[Variant], context_length: int,
                   both_strands: bool, device: torch.device, batch_size: int, progress: bool = True,
                   autocast: bool = True) -> None:
    """Fill v.score (and v.note) for every record (bf16 autocast on a GPU unless autocast=False)."""
    objective = meta.get("objective", "causal")
    softmask = bool(meta.get("keep_softmask", False))
    match = contig_matcher(genome)
    use_amp = autocast and device.type == "cuda"
    jobs = []   # (variant, contig index)
    for v in variants:
        ok = check_record(v, genome, match, max(1, context_length // 4))
        if ok is None:
            continue
        i, v.note = ok
        if objective == "mlm" and (len(v.ref) != 1 or len(v.alts[0]) != 1):
            v.note = "indel / MNV: a masked LM scores SNVs only"
            continue
        jobs.append((v, i))
    if not jobs:
        return
    from tqdm import tqdm
    scores = np.zeros(len(jobs))
    step = 256   # records per pass, their windows read for that pass only: memory does not grow with the VCF
    for j in tqdm(range(0, len(jobs), step), desc="score", unit=f"x{step} variants", disable=not progress):
        part = [(v, *variant_windows(genome, i, v, context_length, softmask)) for v, i in jobs[j:j + step]]
        strands = [(r, a, s, len(v.ref), len(v.alts[0])) for v, r, a, s in part]
        per_strand = []
        for rc in ([False, True] if both_strands else [False]):
            if rc:   # the reverse complement: the variant now starts len(right flank) into each window
                strands = [(tok.reverse_complement(r), tok.reverse_complement(a), len(r) - s - lr, lr, la)
                           for r, a, s, lr, la in strands]
            if objective == "mlm":
                items = [(r, s, int(tok.unmask(r[s])), int(tok.unmask(a[s]))) for r, a, s, _, _ in strands]
                per_strand.append(masked_site_llr(model, items, device, batch_size, use_amp))
            else:
                seqs = [(r, s) for r, _, s, _, _ in strands] + [(a, s) for _, a, s, _, _ in strands]
                ll = causal_suffix_loglik(model, seqs, device, batch_size, use_amp)
                per_strand.append(ll[len(strands):] - ll[:len(strands)])
        scores[j:j + len(part)] = np.mean(per_strand, axis=0)
    for (v, _), sc in zip(jobs, scores):
        v.score = float(sc)


def write_tsv(path: Path, variants: list[Variant]) -> None:
    lines = ["chrom\tpos\tid\tref\talt\tscore\tnote"]
    for v in variants:
        sc = "" if v.score is None else f"{v.score:.6g}"
        lines.append(f"{v.chrom}\t{v.pos}\t{v.id}\t{v.ref}\t{','.join(v.alts) or '.'}\t{sc}\t{v.note}")
    write_text_atomic(path, "\n".join(lines) + "\n")


def write_vcf(path: Path, genome: Genome, rows: list[dict]) -> Path:
    """A VCF 4.2 of the planted demo variants (INFO CLASS = motif / background, MOTIF_OFFSET)."""
    head = ["##fileformat=VCFv4.2", "##source=genomics.score demo (variants planted in the demo genome)"]
    head += [f"##contig=<ID={c.name},length={c.length}>" for c in genome.contigs]
    head += ['##INFO=<ID=CLASS,Number=1,Type=String,Description="motif (breaks a planted motif) or background">',
             '##INFO=<ID=MOTIF_OFFSET,Number=1,Type=Integer,Description="changed position inside the motif">',
             "#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO"]
    body = [f"{r['contig']}\t{r['pos'] + 1}\t{r['label']}{k}\t{r['ref']}\t{r['alt']}\t.\tPASS\t"
            f"CLASS={r['label']};MOTIF_OFFSET={r['motif_offset']}" for k, r in enumerate(rows)]
    return write_text_atomic(path, "\n".join(head + body) + "\n")


def demo_report(variants: list[Variant], rows: list[dict], out: Path, checkpoint: str, cfg: ScoreConfig) -> dict:
    """AUROC of 'motif-breaking scores lower than background', overall and by offset inside the motif."""
    from sklearn.metrics import roc_auc_score, roc_curve
    y = np.array([r["label"] == "motif" for r in rows])
    s = np.array([v.score for v in variants], dtype=float)
    ok = np.isfinite(s)
    auroc = float(roc_auc_score(y[ok], -s[ok]))
    offsets = np.array([r["motif_offset"] for r in rows])
    by_offset = {}
    for lo, hi in ((0, 2), (2, 5), (5, max(6, int(offsets.max()) + 1))):
        sel = ok & (~y | ((offsets >= lo) & (offsets < hi)))
        if (y[sel]).any():
            by_offset[f"{lo}-{hi - 1}"] = {"auroc": float(roc_auc_score(y[sel], -s[sel])),
                                           "n_motif": int(y[sel].sum())}
    # The same AUROC for the generator's own likelihood ratio: what a perfect model of the demo genome gets.
    generator = demo.generator_llr(rows)
    oracle = float(roc_auc_score(y, -generator))
    res = {"auroc_motif_breaking_vs_background": auroc, "auroc_by_motif_offset": by_offset,
           "generator_auroc": oracle,
           "n_motif": int(y[ok].sum()), "n_background": int((~y[ok]).sum()),
           "mean_score_motif": float(s[ok & y].mean()), "mean_score_background": float(s[ok & ~y].mean()),
           "context_length": cfg.context_length, "checkpoint": checkpoint, "seed": cfg.seed,
           "contigs": sorted({r["contig"] for r in rows})}
    write_json_atomic(out / "score.json", res)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4))
    fpr, tpr, _ = roc_curve(y[ok], -s[ok])
    ax.plot(fpr, tpr, label=f"model: AUROC {auroc:.3f}")
    gfpr, gtpr, _ = roc_curve(y, -generator)
    ax.plot(gfpr, gtpr, label=f"generator's own ratio: {oracle:.3f}")
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    ax.set(xlabel="false positive rate (background)", ylabel="true positive rate (motif-breaking)",
           title="planted demo variants: low score = damaging")
    ax.legend()
    bins = np.linspace(np.nanmin(s), np.nanmax(s), 40)
    bx.hist(s[ok & ~y], bins, alpha=0.6, label="background")
    bx.hist(s[ok & y], bins, alpha=0.6, label="motif-breaking")
    bx.set(xlabel="log-likelihood ratio ALT vs REF (nats)", ylabel="variants")
    bx.legend()
    save_figure_atomic(fig, out / "score_roc.png")
    return res


def main(cfg: ScoreConfig) -> dict:
    model, meta, device = load_model(cfg.checkpoint, cfg.device)
    out_path = Path(cfg.output)
    out_dir = prepare_output_dir(out_path.parent if str(out_path.parent) else ".", flag="--output")
    both = bool(model.config.rc_equivariant) if cfg.both_strands is None else cfg.both_strands
    rows = None
    if cfg.vcf is None:      # the demo: plant variants in the held-out demo contigs
        fasta = demo.demo_genome(Path(cfg.cache_dir) / f"demo-v{demo.VERSION}" if cfg.cache_dir else None)
        genome = Genome.open([str(fasta)], cfg.cache_dir)
        rows = demo.planted_variants(seed=cfg.seed)
        vcf = write_vcf(out_dir / "demo_variants.vcf", genome, rows)
        print(f"planted {len(rows)} SNVs in chr20/chr21 of the demo genome -> {vcf}")
    else:
        genome = Genome.open(cfg.fasta, cfg.cache_dir)
        vcf = cfg.vcf
    variants = read_vcf(str(vcf))
    score_variants(model, meta, genome, variants, cfg.context_length, both, device, cfg.batch_size)
    scored = sum(v.score is not None for v in variants)
    if not scored and all(v.note.startswith("contig ") for v in variants):
        raise UserError(f"--vcf {vcf}: none of its contigs is in the FASTA (e.g. {variants[0].chrom!r}; "
                        f"FASTA has {', '.join(c.name for c in genome.contigs[:4])})")
    write_tsv(out_path, variants)
    print(f"{scored} of {len(variants)} records scored"
          + (f", {len(variants) - scored} with a note (see the note column)" if scored < len(variants) else "")
          + f" -> {out_path}")
    result = {"scored": scored, "records": len(variants)}
    if rows is not None:
        result.update(demo_report(variants, rows, out_dir, cfg.checkpoint, cfg))
        print(f"AUROC motif-breaking vs background: {result['auroc_motif_breaking_vs_background']:.3f} "
              f"({result['n_motif']} + {result['n_background']} variants; the generator's own likelihood ratio: "
              f"{result['generator_auroc']:.3f}) -> {out_dir / 'score.json'}")
    return result


if __name__ == "__main__":
    main_entry(main, ScoreConfig, "python -m genomics.score", description=__doc__.split("\n\n")[0])
