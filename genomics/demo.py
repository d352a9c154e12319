"""The embedded demo genome: a deterministic, hg38-shaped FASTA generated on first use, whose per-base
entropy is known, so a pretraining run can be judged against the best achievable bits per base.

What it holds (all from one seed, numpy only, about a second to generate):
  * background: an order-2 Markov chain (transition rows ~ Dirichlet(2), about 1.75 bits/base) whose
    G+C weight drifts slowly along each contig (isochore-like GC-content drift);
  * dispersed repeats: copies of three Alu-like family consensus sequences (some reverse-complemented),
    6% substitutions, soft-masked (lower case) as RepeatMasker would;
  * tandem repeats: a 2-8 base unit repeated, 3% substitutions, soft-masked;
  * motifs: two conserved position weight matrices (10-15 bases, 0.97 on the consensus base) planted at
    random, 1.5% of the bases;
  * runs of N (assembly gaps), at contig ends and inside.
Contigs are chr1, chr2, chr3 (training), chr20 (validation) and chr21 (test), as hg38's hold-out defaults.

The "known entropy" is that of the distribution each base was drawn from, given the generator's hidden
state (which family, which offset, the local GC weight), averaged over the non-N bases of a contig. No model
can beat it on average; a model that learns the chain, the motifs and the repeats gets close to it. It is
written next to the FASTA as `demo.entropy.json`.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ssm_core.io import atomic_path, write_json_atomic

VERSION = 3
SEED = 20261123
CONTIGS = {"chr1": 1_200_000, "chr2": 900_000, "chr3": 600_000, "chr20": 250_000, "chr21": 250_000}
MOTIF_PWM_TOP = 0.97      # conserved: breaking a motif costs log(0.01 / 0.97) = -4.6 nats under the generator
CHAIN_ALPHA = 2.0         # Dirichlet concentration of the chain's rows (~1.75 bits/base): at 1.0 the rows are
                          # so peaked that a random SNV often costs as much as breaking a motif
NEUTRAL_SITE_BITS = 1.9   # planted background SNVs sit where the chain's distribution is at least this flat
MOTIF_FRAC = 0.015        # share of bases in motif placements: ~1,600 of each motif in training, enough for
                          # the README's CPU model to learn both on every seed tried (with four, one seed of two
                          # learned only half of them)
ORDER = 2                  # Markov order of the background chain
N_CTX = 4 ** ORDER
LINE_WIDTH = 60
_COMP = bytes.maketrans(b"ACGTacgtN", b"TGCAtgcaN")


def cache_root() -> Path:
    """Where generated data lives: $GENOMICS_CACHE, else $XDG_CACHE_HOME/long-ssm/genomics."""
    if os.environ.get("GENOMICS_CACHE"):
        return Path(os.environ["GENOMICS_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "long-ssm" / "genomics"


def _h(p: np.ndarray) -> np.ndarray:
    """Entropy in bits along the last axis."""
    p = np.clip(p, 1e-12, 1.0)
    return -(p * np.log2(p)).sum(-1)


def _mutation_entropy(rate: float) -> float:
    return float(_h(np.array([1 - rate] + [rate / 3] * 3)))


def markov_table(rng: np.random.Generator, alpha: float = CHAIN_ALPHA) -> np.ndarray:
    """Transition table of the background chain (4**ORDER contexts x 4 bases)."""
    return rng.dirichlet([alpha] * 4, size=N_CTX)


def sample_background(rng: np.random.Generator, table: np.ndarray, gc: np.ndarray, lane: int = 4096):
    """Sample bases 0..3 (ACGT) from the GC-weighted Markov chain, and each base's entropy in bits.

    Vectorised over independent lanes of `lane` bases (each lane restarts the chain), so a megabase takes
    a few thousand numpy steps instead of a million Python ones."""
    n = gc.shape[0]
    n_lanes = -(-n // lane)
    gc_l = np.resize(gc, n_lanes * lane).reshape(n_lanes, lane)
    u = rng.random((n_lanes, lane))
    out = np.zeros((n_lanes, lane), dtype=np.uint8)
    ent = np.zeros((n_lanes, lane), dtype=np.float32)
    ctx = rng.integers(0, N_CTX, n_lanes)
    for t in range(lane):
        g = gc_l[:, t:t + 1]
        p = table[ctx] * np.concatenate([1 - g, g, g, 1 - g], axis=1)
        p /= p.sum(1, keepdims=True)
        b = (u[:, t:t + 1] > np.cumsum(p, 1)).sum(1).clip(0, 3)
        out[:, t] = b
        ent[:, t] = _h(p)
        ctx = (ctx * 4 + b) % N_CTX
    return out.reshape(-1)[:n], ent.reshape(-1)[:n]


def _mutate(rng, seq: np.ndarray, rate: float) -> np.ndarray:
    hit = rng.random(seq.shape[0]) < rate
    shift = rng.integers(1, 4, seq.shape[0])
    return np.where(hit, (seq + shift) % 4, seq).astype(np.uint8)


def make_motifs(rng: np.random.Generator, n: int = 2) -> list[np.ndarray]:
    """PWMs (length x 4) with MOTIF_PWM_TOP on a random consensus base per column. Two: each is placed often
    enough for a 1,000-step CPU model to learn it."""
    motifs = []
    for _ in range(n):
        length = int(rng.integers(10, 16))
        cons = rng.integers(0, 4, length)
        pwm = np.full((length, 4), (1 - MOTIF_PWM_TOP) / 3)
        pwm[np.arange(length), cons] = MOTIF_PWM_TOP
        motifs.append(pwm)
    return motifs


def sample_pwm(rng: np.random.Generator, pwm: np.ndarray) -> np.ndarray:
    u = rng.random((pwm.shape[0], 1))
    return (u > np.cumsum(pwm, 1)).sum(1).clip(0, 3).astype(np.uint8)


def generate_contig(rng, length: int, table, families, motifs, repeat_frac=0.01, tandem_frac=0.008,
                    motif_frac=MOTIF_FRAC, n_runs: int = 3, hidden: dict | None = None):
    """One contig: (ASCII bytes with soft-masking, per-base entropy in bits, motif placements). `hidden`, if
    given, receives the local G+C weight of every base ("gc")."""
    x = np.arange(length)
    period, phase = rng.uniform(20_000, 60_000), rng.uniform(0, 2 * np.pi)
    gc = 0.45 + 0.1 * np.sin(2 * np.pi * x / period + phase)
    if hidden is not None:
        hidden["gc"] = gc
    seq, ent = sample_background(rng, table, gc)
    soft = np.zeros(length, dtype=bool)
    placed = []

    def spans(frac, mean_len):
        count = max(1, int(frac * length / mean_len))
        return rng.integers(0, length - 400, count)

    h_rep, h_tan = _mutation_entropy(0.06), _mutation_entropy(0.03)
    for start in spans(repeat_frac, 220):
        fam = families[int(rng.integers(len(families)))]
        copy = _mutate(rng, fam, 0.06)
        if rng.random() < 0.5:
            copy = (3 - copy)[::-1]          # reverse complement in 0..3 coding (A<->T, C<->G)
        end = min(length, start + copy.shape[0])
        seq[start:end], ent[start:end], soft[start:end] = copy[:end - start], h_rep, True
    for start in spans(tandem_frac, 60):
        unit = rng.integers(0, 4, int(rng.integers(2, 9))).astype(np.uint8)
        total = int(rng.integers(20, 100))
        rep = _mutate(rng, np.resize(unit, total), 0.03)
        seq[start:start + total], soft[start:start + total] = rep, True
        ent[start:start + total] = h_tan
        ent[start:start + unit.shape[0]] = 2.0                     # the first unit is a uniform draw
    for start in spans(motif_frac, 12.5):
        m = int(rng.integers(len(motifs)))
        pwm = motifs[m]
        seq[start:start + pwm.shape[0]] = sample_pwm(rng, pwm)
        ent[start:start + pwm.shape[0]] = _h(pwm)
        placed.append((int(start), m))

    chars = np.frombuffer(b"ACGT", dtype=np.uint8)[seq]
    chars = np.where(soft, chars + 32, chars).astype(np.uint8)     # lower case = soft-masked
    n_mask = np.zeros(length, dtype=bool)
    n_mask[:int(rng.integers(500, 3000))] = True                  # telomere-like gaps at both ends
    n_mask[length - int(rng.integers(500, 3000)):] = True
    for _ in range(n_runs):
        s = int(rng.integers(0, length - 5000))
        n_mask[s:s + int(rng.integers(100, 5000))] = True
    chars[n_mask] = ord("N")
    ent[n_mask] = np.nan
    return chars.tobytes(), ent, placed


def write_fasta(path: str | os.PathLike, records: list[tuple[str, bytes]], line_width: int = LINE_WIDTH) -> Path:
    """Write FASTA and its samtools-style .fai index atomically (so no indexer is needed to read it)."""
    path = Path(path)
    fai_lines, offset, chunks = [], 0, []
    for name, seq in records:
        header = f">{name}\n".encode()
        offset += len(header)
        body = b"".join(seq[i:i + line_width] + b"\n" for i in range(0, len(seq), line_width))
        fai_lines.append(f"{name}\t{len(seq)}\t{offset}\t{line_width}\t{line_width + 1}\n")
        chunks += [header, body]
        offset += len(body)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.writelines(chunks)
    with atomic_path(str(path) + ".fai") as tmp:
        tmp.write_text("".join(fai_lines))
    return path


def demo_genome(root: str | os.PathLike | None = None, contigs: dict[str, int] | None = None) -> Path:
    """Path of the demo genome FASTA, generating it (and demo.entropy.json) on first use."""
    contigs = contigs or CONTIGS
    tag = "" if contigs == CONTIGS else "-" + hashlib.sha1(json.dumps(contigs).encode()).hexdigest()[:8]
    folder = Path(root) if root else cache_root() / f"demo-v{VERSION}{tag}"
    fasta = folder / "demo.fa"
    if fasta.is_file() and (folder / "demo.entropy.json").is_file() and Path(str(fasta) + ".fai").is_file():
        return fasta
    rng = np.random.default_rng(SEED)
    table = markov_table(rng)
    families = [sample_background(rng, table, np.full(int(n), 0.45))[0] for n in rng.integers(150, 300, 3)]
    motifs = make_motifs(rng)
    records, entropy, counted = [], {}, {}
    for name, length in contigs.items():
        seq, ent, _ = generate_contig(rng, length, table, families, motifs)
        records.append((name, seq))
        entropy[name] = float(np.nanmean(ent))
        counted[name] = int(np.isfinite(ent).sum())
    write_fasta(fasta, records)
    write_json_atomic(folder / "demo.entropy.json", {
        "bits_per_base": entropy, "non_n_bases": counted, "seed": SEED, "version": VERSION,
        "definition": "mean over non-N bases of the entropy of the distribution each base was drawn from, "
                      "given the generator's hidden state"})
    return fasta


def known_entropy(fasta: str | os.PathLike, contigs: list[str]) -> float | None:
    """The generator's bits per base over `contigs` (length-weighted), if `fasta` is a demo genome."""
    p = Path(fasta).with_name("demo.entropy.json")
    if not p.is_file():
        return None
    meta = json.loads(p.read_text())
    bits = meta["bits_per_base"]
    if not contigs or any(c not in bits for c in contigs):
        return None
    w = np.array([meta["non_n_bases"][c] for c in contigs], dtype=float)
    return float(np.dot([bits[c] for c in contigs], w) / w.sum())


# --- downstream tasks built from the same generator ----------------------------------------------------
def motif_task(n: int = 400, length: int = 200, seed: int = 1) -> tuple[list[str], np.ndarray]:
    """Planted-motif classification: background windows of the demo chain; label 1 = motif 0 planted."""
    rng = np.random.default_rng(SEED)
    table = markov_table(rng)
    [sample_background(rng, table, np.full(int(k), 0.45)) for k in rng.integers(150, 300, 3)]
    motif = make_motifs(rng)[0]
    rng = np.random.default_rng(seed)
    seqs, labels = [], np.arange(n) % 2
    bg, _ = sample_background(rng, table, np.full(n * length, 0.45), lane=length)
    for i in range(n):
        s = bg[i * length:(i + 1) * length].copy()
        if labels[i]:
            at = int(rng.integers(0, length - motif.shape[0]))
            s[at:at + motif.shape[0]] = sample_pwm(rng, motif)
        seqs.append(bytes(np.frombuffer(b"ACGT", dtype=np.uint8)[s]).decode())
    return seqs, labels


def species_fastas(folder: str | os.PathLike, n_species: int = 3, contig_len: int = 60_000) -> list[Path]:
    """Several 'species' FASTAs (the Great Apes setting in miniature): each has its own perturbation of the
    demo chain's transition table, so windows can be told apart by composition and context."""
    folder = Path(folder)
    rng = np.random.default_rng(SEED + 1)
    # The species' chains keep their own peaked rows (Dirichlet(1)), independent of the demo genome's chain.
    base = markov_table(rng, 1.0)
    out = []
    for k in range(n_species):
        table = 0.7 * base + 0.3 * markov_table(rng, 1.0)
        recs = []
        for c in range(2):
            seq, _ = sample_background(rng, table, np.full(contig_len, 0.45))
            recs.append((f"sp{k}_chr{c + 1}", bytes(np.frombuffer(b"ACGT", dtype=np.uint8)[seq])))
        out.append(write_fasta(folder / f"species{k}.fa", recs))
    return out


# --- planted variants (genomics.score's demo) ------------------------------------------------------------
def generator_sites(contigs: dict[str, int] | None = None) -> tuple[dict[str, tuple[bytes, list, np.ndarray]],
                                                                     list[np.ndarray], np.ndarray]:
    """Re-run the generator with its seed: {contig: (sequence bytes, motif placements (start, motif index),
    local G+C weight per base)}, the motif PWMs and the chain's transition table. The same bytes as
    demo_genome writes; a few seconds."""
    contigs = contigs or CONTIGS
    rng = np.random.default_rng(SEED)
    table = markov_table(rng)
    families = [sample_background(rng, table, np.full(int(n), 0.45))[0] for n in rng.integers(150, 300, 3)]
    motifs = make_motifs(rng)
    out = {}
    for name, length in contigs.items():
        hidden = {}
        seq, _, placed = generate_contig(rng, length, table, families, motifs, hidden=hidden)
        out[name] = (seq, placed, hidden["gc"])
    return out, motifs, table


def generator_llr(rows: list[dict]) -> np.ndarray:
    """The generator's own log-likelihood ratio ALT vs REF (nats) of each planted SNV (`planted_variants`):
    at a motif site the PWM's ratio, in the background the chain's over the SNV and the ORDER bases after it
    (whose contexts it changes), at the local G+C weight. What a perfect model of the demo genome would score:
    the ceiling for any model's AUROC on these variants."""
    sites, motifs, table = generator_sites()
    out = np.zeros(len(rows))

    def chain(b: list[int], gc: np.ndarray, t: int) -> float:
        p = table[b[t - 2] * 4 + b[t - 1]] * np.array([1 - gc[t], gc[t], gc[t], 1 - gc[t]])
        return float(np.log(p[b[t]] / p.sum()))

    for j, r in enumerate(rows):
        seq, placed, gc = sites[r["contig"]]
        p = r["pos"]
        ref = [b"ACGT".index(bytes([c]).upper()) for c in seq[p - ORDER:p + ORDER + 1]]
        alt = list(ref)
        alt[ORDER] = "ACGT".index(r["alt"])
        win = gc[p - ORDER:p + ORDER + 1]
        if r["label"] == "motif":
            start, m = next((s, m) for s, m in placed if s <= p < s + motifs[m].shape[0])
            pwm, k = motifs[m], p - start
            out[j] = np.log(pwm[k, alt[ORDER]] / pwm[k, ref[ORDER]])
            # bases after the motif's end are the chain's again, with the SNV in their context
            after = [t for t in range(ORDER + 1, 2 * ORDER + 1) if k + t - ORDER >= pwm.shape[0]]
        else:
            after = list(range(ORDER, 2 * ORDER + 1))
        out[j] += sum(chain(alt, win, t) - chain(ref, win, t) for t in after)
    return out


def _row_entropy(table: np.ndarray, ctx: np.ndarray, gc: np.ndarray) -> np.ndarray:
    """Bits of the chain's next-base distribution in contexts `ctx` at local G+C weights `gc`."""
    p = table[ctx] * np.stack([1 - gc, gc, gc, 1 - gc], 1)
    return _h(p / p.sum(1, keepdims=True))


def _flat_snv(table, codes: np.ndarray, gc: np.ndarray, pos: np.ndarray, alt: int, bits: float) -> np.ndarray:
    """Whether base `alt` at each of `pos` and the REF there both leave the chain's distribution at least
    `bits` flat at the site and at the ORDER bases after it (whose contexts the SNV changes)."""
    flat = np.ones(len(pos), dtype=bool)
    for allele in (codes[pos], np.full(len(pos), alt)):
        for j in range(ORDER + 1):
            ctx = np.zeros(len(pos), dtype=np.int64)
            for i in range(ORDER):                  # the context of base pos + j: bases pos + j - ORDER ...
                q = pos + j - ORDER + i
                ctx = ctx * 4 + np.where(q == pos, allele, codes[q])
            flat &= _row_entropy(table, ctx, gc[pos + j]) >= bits
    return flat


def planted_variants(contigs: tuple[str, ...] = ("chr20", "chr21"), seed: int = 0,
                     margin: int = 100, flat_bits: float = NEUTRAL_SITE_BITS) -> list[dict]:
    """SNVs on the held-out demo contigs, half of them breaking a planted motif, half in the background.

    Motif-breaking: one per motif placement that no later placement, repeat (soft-mask) or N run touched:
    a position where the placed base is the motif's consensus, changed to a non-consensus base. Background:
    as many positions of the Markov chain at least `margin` bases from any placement, repeat or N where the
    generator's distribution is flat: the chain's next-base distribution has at least `flat_bits` of
    entropy at the site and, with REF and with ALT in their context, at the ORDER bases after it (a neutral
    site, as most common polymorphisms are), ALT drawn among the bases that keep it flat. Dicts with contig, pos (0-based), ref, alt, label ('motif' or
    'background') and motif_offset (the changed position inside the motif, -1 for background)."""
    sites, motifs, table = generator_sites()
    rng = np.random.default_rng([SEED, seed])
    out = []
    for name in contigs:
        seq, placed, gc = sites[name]
        arr = np.frombuffer(seq, dtype=np.uint8)
        plain = np.isin(arr, np.frombuffer(b"ACGT", dtype=np.uint8))   # upper case: not repeat, not N
        covered = np.zeros(len(arr), dtype=np.int32)
        for start, m in placed:
            covered[start:start + motifs[m].shape[0]] += 1
        motif_rows = []
        for start, m in placed:
            cons = motifs[m].argmax(1)
            end = start + len(cons)
            if (covered[start:end] != 1).any() or not plain[start:end].all():
                continue
            bases = np.searchsorted(np.frombuffer(b"ACGT", dtype=np.uint8), arr[start:end])
            ok = np.nonzero(bases == cons)[0]
            if not len(ok):
                continue
            k = int(rng.choice(ok))
            alt = int(rng.choice([b for b in range(4) if b != cons[k]]))
            motif_rows.append({"contig": name, "pos": start + k, "ref": "ACGT"[cons[k]], "alt": "ACGT"[alt],
                               "label": "motif", "motif_offset": k})
        near = np.convolve((covered > 0) | ~plain, np.ones(2 * margin + 1), mode="same") > 0
        far = np.nonzero(~near)[0]
        far = far[(far >= margin) & (far < len(arr) - margin)]
        codes = np.searchsorted(np.frombuffer(b"ACGT", dtype=np.uint8), arr & 0xDF).clip(0, 3)   # upper-cased
        ok = np.stack([_flat_snv(table, codes, gc, far, a, flat_bits) & (codes[far] != a) for a in range(4)], 1)
        pick = rng.choice(np.nonzero(ok.any(1))[0], size=min(len(motif_rows), int(ok.any(1).sum())), replace=False)
        for i in np.sort(pick):
            p, ref = int(far[i]), int(codes[far[i]])
            alt = int(rng.choice(np.nonzero(ok[i])[0]))
            out.append({"contig": name, "pos": p, "ref": "ACGT"[ref], "alt": "ACGT"[alt],
                        "label": "background", "motif_offset": -1})
        out += motif_rows
    return sorted(out, key=lambda r: (r["contig"], r["pos"]))


# --- a genome whose dependencies reach far: for context-length experiments -----------------------------
LONG_RANGE_CONTIGS = {"chr1": 6_000_000, "chr20": 1_500_000, "chr21": 1_500_000}
LONG_RANGE_SEGMENT = 500           # bases per copied segment
LONG_RANGE_COPY_FRAC = 0.5         # fraction of the segments that are copies of an earlier one
LONG_RANGE_DISTANCES = (1_000, 500_000)   # copy distance ~ LogUniform over this range, in bases
LONG_RANGE_DIVERGENCE = 0.1        # substitutions per copied base
LONG_RANGE_CONTEXTS = tuple(2 ** k for k in range(10, 18))   # 1k .. 131k
# Per base of each held-out contig: the base (0..3 = ACGT), its copy distance (0: background), the entropy it
# was drawn with, and the background chain's entropy there (what a predictor without the copy's source faces).
LONG_RANGE_ANNOTATION = "demo.copies.npz"


def _generated_folder(root, name: str, key: list, default_key: list) -> tuple[Path, Path]:
    """(folder, its demo.fa) of a generated genome: `root`, else the cache folder `name`, suffixed with a
    hash of `key` when it is not the default (so a test's small genome never stands in for the real one).
    Keys compare as JSON (a tuple equals the list it is written as)."""
    key, default_key = json.loads(json.dumps(key)), json.loads(json.dumps(default_key))
    tag = "" if key == default_key else "-" + hashlib.sha1(json.dumps(key).encode()).hexdigest()[:8]
    folder = Path(root) if root else cache_root() / f"{name}{tag}"
    return folder, folder / "demo.fa"


def _save_annotation(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)


def long_range_contig(rng, length: int, table, segment: int = LONG_RANGE_SEGMENT,
                      copy_frac: float = LONG_RANGE_COPY_FRAC, distances: tuple[int, int] = LONG_RANGE_DISTANCES,
                      divergence: float = LONG_RANGE_DIVERGENCE):
    """One contig of the background chain in which a `copy_frac` of the `segment`-base segments are diverged
    copies of the segment `d` bases earlier, d ~ LogUniform(distances). Returns (bases 0..3, per-base entropy
    in bits given the hidden state, per-base copy distance or 0 for background). Copies are made in order, so
    a copy may copy a copy; the source is the sequence as it stands."""
    seq, ent = sample_background(rng, table, np.full(length, 0.45))
    background_ent = ent.copy()
    dist = np.zeros(length, dtype=np.int64)
    h_copy = _mutation_entropy(divergence)
    lo, hi = np.log(distances[0]), np.log(distances[1])
    for start in range(0, length - segment + 1, segment):
        if rng.random() >= copy_frac:
            continue
        d = int(np.exp(rng.uniform(lo, hi)))
        if start - d < 0:
            continue
        seq[start:start + segment] = _mutate(rng, seq[start - d:start - d + segment], divergence)
        ent[start:start + segment] = h_copy
        dist[start:start + segment] = d
    return seq, ent, dist, background_ent


def long_range_genome(root: str | os.PathLike | None = None, contigs: dict[str, int] | None = None,
                      contexts: tuple[int, ...] = LONG_RANGE_CONTEXTS) -> Path:
    """Path of the long-range genome FASTA (demo.fa in its own folder, with demo.entropy.json), generated on
    first use. Its entropy file also holds, per held-out contig, `bits_per_base_at_context`: the generator's
    bits per base for a predictor that sees `context` bases back, i.e. that can use the copies whose source
    is at most that far (a copied base with its source out of view is counted at the background chain's
    entropy there), and `bits_per_base_in_windows`: the same for bases scored in windows of `context` bases,
    where a base at offset t sees only t bases back (what pretraining's validation at that --seq-len
    measures). These curves are what a model trained at each context can at best reach."""
    contigs = contigs or LONG_RANGE_CONTIGS
    folder, fasta = _generated_folder(root, "longrange-v1", [contigs, contexts], [LONG_RANGE_CONTIGS, LONG_RANGE_CONTEXTS])
    if all(f.is_file() for f in (fasta, folder / "demo.entropy.json", Path(str(fasta) + ".fai"),
                                 folder / LONG_RANGE_ANNOTATION)):
        return fasta
    rng = np.random.default_rng(SEED + 1)
    table = markov_table(rng)
    records, entropy, counted, at_context, in_windows, annotation = [], {}, {}, {}, {}, {}
    for name, length in contigs.items():
        seq, ent, dist, bg = long_range_contig(rng, length, table)
        records.append((name, np.frombuffer(b"ACGT", dtype=np.uint8)[seq].tobytes()))
        if name != "chr1":   # the held-out contigs, base by base (13 bytes a base: the training contig is left out)
            annotation.update({f"{name}/bases": seq, f"{name}/copy_distance": dist.astype(np.int32),
                               f"{name}/entropy": ent, f"{name}/background_entropy": bg})
        entropy[name] = float(ent.mean())
        counted[name] = int(length)
        at_context[name] = {str(c): float(np.where((dist > 0) & (dist < c), ent, bg).mean()) for c in contexts}
        # Scored in windows of c bases (as pretraining's validation is), a base at offset t sees t bases back:
        # its copy's source is in view for a fraction max(0, 1 - d / c) of the offsets.
        in_view = [np.clip(1 - dist / c, 0, 1) * (dist > 0) for c in contexts]
        in_windows[name] = {str(c): float((v * ent + (1 - v) * bg).mean()) for c, v in zip(contexts, in_view)}
    write_fasta(fasta, records)
    _save_annotation(folder / LONG_RANGE_ANNOTATION, annotation)
    write_json_atomic(folder / "demo.entropy.json", {
        "bits_per_base": entropy, "non_n_bases": counted, "bits_per_base_at_context": at_context,
        "bits_per_base_in_windows": in_windows,
        "seed": SEED + 1, "segment": LONG_RANGE_SEGMENT, "copy_frac": LONG_RANGE_COPY_FRAC,
        "distances": list(LONG_RANGE_DISTANCES), "divergence": LONG_RANGE_DIVERGENCE,
        "definition": "mean over bases of the entropy of the distribution each base was drawn from, given the "
                      "generator's hidden state (a copied base: the substitution entropy; bits_per_base_at_context "
                      "counts copies whose source is `context` or more bases back at the background's entropy; "
                      "bits_per_base_in_windows: bases scored in windows of `context` bases)"})
    return fasta


# --- a genome of regions, each with its own chain: what a recurrent state can carry across a long context -----
# Real genomes change composition over hundreds of kilobases (isochores, gene-dense vs gene-poor domains).
# Here every region draws its own Markov chain, so a predictor that has read more of the region
# estimates the region's statistics better: a dependency of a few hundred numbers (the region's transition
# counts), paid out at every base, which a fixed-size state can hold, unlike the copies above (which need the
# whole span's bases). The best curve it allows falls from 1k to 131k and is computed exactly below.
REGIONAL_CONTIGS = {"chr1": 32_000_000, "chr20": 1_500_000, "chr21": 1_500_000}
# Per base of each held-out contig: the base (0..3 = ACGT) and its region's index; and the chains' order and
# alpha (what the Bayes predictor needs).
REGIONAL_ANNOTATION = "demo.regions.npz"


@dataclass(frozen=True)
class Regions:
    """How the regional genome's regions are drawn."""
    order: int = 2                      # Markov order of each region's chain: 4**order contexts x 3 free numbers
    alpha: float = 1.0                  # Dirichlet concentration of each region's rows (1.0: ~1.5-1.6 bits/base)
    lengths: tuple[int, int] = (1 << 17, 1 << 20)   # region length ~ LogUniform over this range, in bases

    def __post_init__(self):
        if not 0 <= self.order <= 6:
            raise ValueError(f"regions.order: must be in 0..6, got {self.order}")
        if not self.alpha > 0:
            raise ValueError(f"regions.alpha: must be > 0, got {self.alpha}")
        if not 1 <= self.lengths[0] <= self.lengths[1]:
            raise ValueError(f"regions.lengths: expected 1 <= shortest <= longest, got {list(self.lengths)}")


def regional_chain(rng, lengths: list[int], order: int, alpha: float):
    """Regions of the given lengths, each an order-`order` Markov chain with its own transition table
    (rows ~ Dirichlet(alpha)); a region's first `order` bases are uniform. Returns (bases 0..3, per-base
    entropy in bits given the region's table, per-base region index). Vectorised over regions: one numpy
    step per base of the longest region."""
    n, longest, n_ctx = len(lengths), max(lengths), 4 ** order
    tables = rng.dirichlet([alpha] * 4, size=(n, n_ctx))
    cum, h = np.cumsum(tables, 2), _h(tables)
    u = rng.random((n, longest))
    out = np.zeros((n, longest), dtype=np.uint8)
    ent = np.full((n, longest), 2.0, dtype=np.float32)
    out[:, :order] = rng.integers(0, 4, (n, order))
    ctx = (out[:, :order].astype(np.int64) * 4 ** np.arange(order - 1, -1, -1)).sum(1)
    lanes = np.arange(n)
    for t in range(order, longest):
        b = (u[:, t:t + 1] > cum[lanes, ctx]).sum(1).clip(0, 3)
        out[:, t], ent[:, t] = b, h[lanes, ctx]
        ctx = (ctx * 4 + b) % n_ctx
    keep = np.arange(longest) < np.asarray(lengths)[:, None]
    return out[keep], ent[keep], np.repeat(np.arange(n), lengths)


def regional_best_bits(seq: np.ndarray, region: np.ndarray, context: int, order: int, alpha: float,
                       windows: bool = True) -> np.ndarray:
    """Per-base bits of the Bayes predictor of the regional genome that sees `context` bases back (windows:
    bases scored in consecutive windows of `context`, a base at offset t seeing t back, as pretraining's
    validation) and knows where regions start: with the Dirichlet prior, its prediction is
    (n(ctx, b) + alpha) / (n(ctx) + 4 alpha), counting the region's transitions in view. No predictor does
    better on average; one that must notice region changes itself does a little worse."""
    n = seq.shape[0]
    i = np.arange(n)
    starts = np.flatnonzero(np.r_[True, region[1:] != region[:-1]])
    region_start = starts[np.searchsorted(starts, i, side="right") - 1]
    view = (i // context) * context if windows else np.maximum(i - context, 0)
    first = np.maximum(view, region_start) + order       # the first base whose context is in view and region
    s = seq.astype(np.int64)
    ctx = np.zeros(n, dtype=np.int64)
    for j in range(1, order + 1):
        ctx[order:] = ctx[order:] * 4 + s[order - j:n - j]

    def seen(code: np.ndarray) -> np.ndarray:
        # Earlier bases of the same region with the same code, at positions >= first: ranks in one sort of
        # (region, code, position) keys.
        key = (region.astype(np.int64) * (4 ** (order + 1)) + code) << 32
        ordered = np.sort(key + i)
        return np.searchsorted(ordered, key + i) - np.searchsorted(ordered, key + first)

    in_view = i >= first
    with np.errstate(divide="ignore", invalid="ignore"):
        p = (seen(ctx * 4 + s) + alpha) / (seen(ctx) + 4 * alpha)
        return np.where(in_view, -np.log2(np.where(in_view, p, 1.0)), 2.0)


def regional_genome(root: str | os.PathLike | None = None, contigs: dict[str, int] | None = None,
                    contexts: tuple[int, ...] = LONG_RANGE_CONTEXTS,
                    regions: Regions = Regions()) -> Path:
    """Path of the regional genome FASTA (demo.fa in its own folder, with demo.entropy.json), generated on
    first use (about a minute and 1 GB of memory at the default size). The entropy file has the same curves
    as long_range_genome's, from the Bayes predictor (regional_best_bits), so benchmarks/dna_context.py reads
    either genome alike."""
    contigs = contigs or REGIONAL_CONTIGS
    folder, fasta = _generated_folder(root, "regional-v1", [contigs, contexts, dataclasses.asdict(regions)],
                                      [REGIONAL_CONTIGS, LONG_RANGE_CONTEXTS, dataclasses.asdict(Regions())])
    if all(f.is_file() for f in (fasta, folder / "demo.entropy.json", Path(str(fasta) + ".fai"),
                                 folder / REGIONAL_ANNOTATION)):
        return fasta
    rng = np.random.default_rng(SEED + 2)
    lo, hi = np.log(regions.lengths[0]), np.log(regions.lengths[1])
    lengths, owner = [], []         # regions of every contig, cut to fit it
    for c, length in enumerate(contigs.values()):
        left = length
        while left > 0:
            lengths.append(min(left, int(np.exp(rng.uniform(lo, hi)))))
            owner.append(c)
            left -= lengths[-1]
    seq, ent, region = regional_chain(rng, lengths, regions.order, regions.alpha)
    bounds = np.cumsum([0] + list(contigs.values()))
    records, entropy, counted, at_context, in_windows, regions_per_contig, annotation = [], {}, {}, {}, {}, {}, {}
    for c, name in enumerate(contigs):
        part = slice(bounds[c], bounds[c + 1])
        records.append((name, np.frombuffer(b"ACGT", dtype=np.uint8)[seq[part]].tobytes()))
        entropy[name], counted[name] = float(ent[part].mean()), int(bounds[c + 1] - bounds[c])
        regions_per_contig[name] = int(np.sum(np.asarray(owner) == c))
        if name != "chr1":      # the held-out contigs (the curves cost a few seconds per context)
            annotation.update({f"{name}/bases": seq[part], f"{name}/region": region[part].astype(np.int32)})
            best = functools.partial(regional_best_bits, seq[part], region[part], order=regions.order,
                                     alpha=regions.alpha)
            at_context[name] = {str(k): float(best(k, windows=False).mean()) for k in contexts}
            in_windows[name] = {str(k): float(best(k).mean()) for k in contexts}
    write_fasta(fasta, records)
    _save_annotation(folder / REGIONAL_ANNOTATION, {**annotation, "order": np.int64(regions.order),
                                                    "alpha": np.float64(regions.alpha)})
    write_json_atomic(folder / "demo.entropy.json", {
        "bits_per_base": entropy, "non_n_bases": counted, "bits_per_base_at_context": at_context,
        "bits_per_base_in_windows": in_windows,
        "seed": SEED + 2, "regions": dataclasses.asdict(regions), "regions_per_contig": regions_per_contig,
        "definition": "bits_per_base: mean over bases of the entropy of the distribution each base was drawn from, "
                      "given its region's table; bits_per_base_at_context / _in_windows: the Bayes predictor "
                      "that knows region starts but not tables, seeing `context` bases back / scored in windows"})
    return fasta
