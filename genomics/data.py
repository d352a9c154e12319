"""Genomes in, token batches out.

    Genome.open(paths)    FASTA files (plain or bgzip; a list = several species) indexed through pyfaidx
                          (.fai written beside the file, or in the cache when that folder is read-only);
                          GenBank/EMBL and plain-gzip FASTA are converted once (biopython) to an indexed
                          FASTA in the cache. Plain FASTA is then read through a memory map: a window is one
                          slice plus a newline strip, no per-base Python.
    make_splits(...)      train/valid/test intervals from held-out contigs or a BED file with a split column.
    WindowSampler         windows at uniformly random offsets over all of a split's bases, as a pure
                          function of (seed, split, batch index, rank): resuming at global step s re-creates
                          exactly the batches an uninterrupted run would have seen from step s on.
    WindowBatches         a map-style Dataset whose item i is batch i of this rank, tokenized and shaped for
                          the objective (causal next-base or masked LM), ready for a DataLoader with workers.
"""
from __future__ import annotations

import gzip
import hashlib
import mmap
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ssm_core.cli import UserError
from ssm_core.io import atomic_path

from . import tokenizer as tok
from .demo import cache_root, write_fasta

SPLITS = ("train", "valid", "test")
_SPLIT_SALT = {"train": 11, "valid": 23, "test": 37}
_BED_SPLIT_NAMES = {"train": "train", "training": "train", "valid": "valid", "val": "valid",
                    "validation": "valid", "test": "test"}


@dataclass(frozen=True)
class Contig:
    source: int        # index of the FASTA file it came from (the species label of a multi-FASTA genome)
    name: str
    length: int
    offset: int        # .fai fields: byte offset of the first base, bases per line, bytes per line
    line_bases: int
    line_width: int
    record: str = ""   # the record's name inside its FASTA (name may be prefixed with the file's stem)


# --- opening and indexing ----------------------------------------------------------------------------------
def sniff(path: Path) -> str:
    """'fasta', 'bgzf', 'gzip' (plain gzip of any text), 'genbank', 'embl' or 'unknown'."""
    with open(path, "rb") as f:
        head = f.read(18)
    if head[:2] == b"\x1f\x8b":
        # BGZF = gzip with an extra field 'BC' (bgzip / samtools): random access through its .gzi index.
        return "bgzf" if len(head) >= 14 and head[3] & 4 and head[12:14] == b"BC" else "gzip"
    text = head.lstrip()
    if text.startswith(b">"):
        return "fasta"
    if text.startswith(b"LOCUS"):
        return "genbank"
    if text.startswith(b"ID "):
        return "embl"
    return "unknown"


def _cache_key(path: Path) -> str:
    st = path.stat()
    return hashlib.sha1(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]


def _writable(folder: Path) -> bool:
    return os.access(folder, os.W_OK | os.X_OK)


def _convert_with_biopython(path: Path, kind: str, cache_dir: Path, flag: str) -> Path:
    """GenBank / EMBL / gzip-compressed files -> a cached plain FASTA with its .fai (done once per file)."""
    from Bio import SeqIO
    out = cache_dir / "converted" / f"{path.stem}.{_cache_key(path)}.fa"
    if out.is_file() and Path(str(out) + ".fai").is_file():
        return out
    opener = gzip.open if kind == "gzip" else open
    records = []
    try:
        with opener(path, "rt") as handle:
            if kind == "gzip":
                first = handle.read(1)
                handle.seek(0)
                kind = {">": "fasta", "L": "genbank", "I": "embl"}.get(first, "fasta")
            for rec in SeqIO.parse(handle, kind):
                records.append((rec.id, str(rec.seq).encode("ascii", errors="replace")))
    except (ValueError, OSError, EOFError, UnicodeDecodeError, zlib.error) as e:   # zlib: corrupt gzip data
        raise UserError(f"{flag} {path}: cannot read as {kind} ({e})") from None
    if not any(len(s) for _, s in records):
        raise UserError(f"{flag} {path}: no sequence records found")
    return write_fasta(out, records)


def _read_fai(fai: Path, source: int) -> list[Contig]:
    contigs = []
    for line in fai.read_text().splitlines():
        if line.strip():
            name, length, offset, lb, lw = line.split("\t")[:5]
            contigs.append(Contig(source, name, int(length), int(offset), int(lb), int(lw), name))
    return contigs


def _index(path: Path, cache_dir: Path, flag: str) -> Path:
    """The .fai of a FASTA (plain or BGZF), built by pyfaidx when missing or stale."""
    fai = Path(str(path) + ".fai")
    if fai.is_file() and fai.stat().st_mtime >= path.stat().st_mtime:
        return fai
    if not _writable(path.parent):
        # A read-only reference folder (a shared hg38): keep the index in our cache instead.
        fai = cache_dir / "fai" / f"{path.name}.{_cache_key(path)}.fai"
        if fai.is_file():
            return fai
        fai.parent.mkdir(parents=True, exist_ok=True)
    import pyfaidx
    # Built beside its final name and renamed into place: a FASTA that fails to index (duplicate names,
    # corrupt BGZF) leaves an existing .fai, which may be the user's, as it was.
    try:
        with atomic_path(fai) as tmp:
            tmp.unlink()   # pyfaidx would read the empty placeholder, newer than the FASTA, as a valid index
            pyfaidx.Faidx(str(path), indexname=str(tmp), rebuild=True, build_index=True).close()
    except (pyfaidx.FastaIndexingError, ValueError, UnicodeDecodeError, EOFError, zlib.error) as e:
        raise UserError(f"{flag} {path}: not a valid FASTA file ({str(e).splitlines()[0]})") from None
    return fai


class Genome:
    """Contigs of one or more FASTA files with fast random access to any [start, end) of a contig."""

    def __init__(self, paths: list[Path], fais: list[Path], contigs: list[Contig], bgzf: list[bool]):
        self.paths, self.fais, self.contigs, self.bgzf = paths, fais, contigs, bgzf
        self._maps: dict[int, np.ndarray] = {}     # opened lazily: each loader worker maps its own
        self._faidx: dict[int, object] = {}

    @classmethod
    def open(cls, paths: list[str | os.PathLike], cache_dir: str | os.PathLike | None = None,
             flag: str = "--fasta") -> Genome:
        cache = Path(cache_dir) if cache_dir else cache_root()
        if not paths:
            raise UserError(f"{flag}: give at least one FASTA file")
        readable, fais, contigs, bgzf = [], [], [], []
        for i, p in enumerate(map(Path, paths)):
            if not p.is_file():
                raise UserError(f"{flag} {p}: no such file")
            kind = sniff(p)
            if kind == "unknown":
                raise UserError(f"{flag} {p}: not a FASTA, GenBank or EMBL file (no '>' header at the start)")
            if kind in ("gzip", "genbank", "embl"):
                p = _convert_with_biopython(p, kind, cache, flag)
                kind = "fasta"
            fai = _index(p, cache, flag)
            found = [c for c in _read_fai(fai, i) if c.length > 0]
            if not found:
                raise UserError(f"{flag} {paths[i]}: no sequence records found")
            readable.append(p), fais.append(fai), bgzf.append(kind == "bgzf")
            contigs += found
        names = [c.name for c in contigs]
        if len(set(names)) != len(names) and len(paths) > 1:
            # Same contig names in several species: prefix with the file's stem so they stay distinct.
            contigs = [Contig(c.source, f"{Path(paths[c.source]).stem}:{c.name}", c.length, c.offset,
                              c.line_bases, c.line_width, c.record) for c in contigs]
        return cls(readable, fais, contigs, bgzf)

    def __getstate__(self):
        return {"paths": self.paths, "fais": self.fais, "contigs": self.contigs, "bgzf": self.bgzf}

    def __setstate__(self, state):
        self.__init__(state["paths"], state["fais"], state["contigs"], state["bgzf"])

    def index_of(self, name: str) -> int | None:
        for i, c in enumerate(self.contigs):
            if c.name == name:
                return i
        return None

    def fetch(self, contig: int, start: int, end: int) -> np.ndarray:
        """Raw bytes (uint8) of contig[start:end], upper/lower case as in the file."""
        c = self.contigs[contig]
        if self.bgzf[c.source]:
            return self._fetch_bgzf(c, start, end)
        mm = self._map(c.source)
        lb, lw = c.line_bases, c.line_width
        a = c.offset + (start // lb) * lw + start % lb
        b = c.offset + ((end - 1) // lb) * lw + (end - 1) % lb + 1
        raw = mm[a:b]
        if lw == lb:
            return raw
        return raw[(raw != 10) & (raw != 13)]     # strip line ends: one vectorised mask, no Python loop

    def _map(self, source: int) -> np.ndarray:
        mm = self._maps.get(source)
        if mm is None:
            with open(self.paths[source], "rb") as f:
                mm = self._maps[source] = np.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ),
                                                        dtype=np.uint8)
        return mm

    def fetch_many(self, contigs: np.ndarray, starts: np.ndarray, width: int) -> np.ndarray:
        """Raw bytes (n, width) of n windows at once: one vectorised gather of file offsets per FASTA, so a
        1M-token batch costs a few numpy passes, not a Python call per window."""
        out = np.empty((len(contigs), width), dtype=np.uint8)
        if not len(contigs):
            return out
        meta = np.array([(c.source, c.offset, c.line_bases, c.line_width) for c in self.contigs], dtype=np.int64)
        src, off, lb, lw = meta[contigs].T
        for source in np.unique(src):
            rows = np.nonzero(src == source)[0]
            if self.bgzf[source]:
                for r in rows:
                    out[r] = self.fetch(int(contigs[r]), int(starts[r]), int(starts[r]) + width)
                continue
            pos = starts[rows, None] + np.arange(width)
            lb_r = lb[rows, None]
            out[rows] = self._map(int(source))[off[rows, None] + (pos // lb_r) * lw[rows, None] + pos % lb_r]
        return out

    def _fetch_bgzf(self, c: Contig, start: int, end: int) -> np.ndarray:
        fa = self._faidx.get(c.source)
        if fa is None:
            import pyfaidx
            fa = self._faidx[c.source] = pyfaidx.Faidx(str(self.paths[c.source]),
                                                       indexname=str(self.fais[c.source]))
        seq = fa.fetch(c.record, start + 1, end).seq
        return np.frombuffer(seq.encode("ascii"), dtype=np.uint8)


# --- splits -----------------------------------------------------------------------------------------------
Interval = tuple[int, int, int]   # (contig index, start, end)


def named_contigs(genome: Genome, names: list[str], flag: str) -> list[int]:
    out = []
    for n in names:
        i = genome.index_of(n)
        if i is None:
            known = ", ".join(c.name for c in genome.contigs[:8]) + (", ..." if len(genome.contigs) > 8 else "")
            raise UserError(f"{flag}: contig {n!r} is not in the FASTA (contigs: {known})")
        out.append(i)
    return out


def make_splits(genome: Genome, val_contigs: list[str] | None, test_contigs: list[str] | None,
                bed: str | None = None, holdout_frac: float = 0.05, min_holdout: int = 0, seed: int = 0,
                info: dict | None = None) -> dict[str, list[Interval]]:
    """Intervals of each split; `info`, if given, is filled with the rule used (for metrics.json).

    BED (chrom, start, end, split) when given. Else contigs named by --val-contigs/--test-contigs (an
    error if absent). With neither: hg38's chr20/chr21 when the genome has them, else the last
    `holdout_frac` (at least `min_holdout` bases, one window) of every contig long enough to spare it is
    validation and as much before it test, and the records too short for that (amplicons, transcripts,
    draft contigs: fewer than 3 x that many bases) are held out whole: `holdout_frac` of those at least
    `min_holdout` long each for validation and test, drawn with `seed`."""
    info = {} if info is None else info
    if bed:
        info.update(rule="bed", bed=str(bed))
        return _bed_splits(genome, bed)
    if val_contigs is None and test_contigs is None:
        if genome.index_of("chr20") is not None and genome.index_of("chr21") is not None:
            val_contigs, test_contigs = ["chr20"], ["chr21"]
        else:
            return _default_splits(genome, holdout_frac, min_holdout, seed, info)
    info.update(rule="named contigs", val_contigs=list(val_contigs or []), test_contigs=list(test_contigs or []))
    val = named_contigs(genome, val_contigs or [], "--val-contigs")
    test = named_contigs(genome, test_contigs or [], "--test-contigs")
    held = set(val) | set(test)
    return {"train": [(i, 0, c.length) for i, c in enumerate(genome.contigs) if i not in held],
            "valid": [(i, 0, genome.contigs[i].length) for i in val],
            "test": [(i, 0, genome.contigs[i].length) for i in test]}


def _default_splits(genome: Genome, holdout_frac: float, min_holdout: int, seed: int,
                    info: dict) -> dict[str, list[Interval]]:
    splits = {s: [] for s in SPLITS}
    short = []
    for i, c in enumerate(genome.contigs):
        k = max(int(c.length * holdout_frac), min_holdout)
        if 3 * k > c.length:        # too short to give up two windows: a candidate for whole-record hold-out
            short.append(i)
            continue
        splits["train"].append((i, 0, c.length - 2 * k))
        splits["test"].append((i, c.length - 2 * k, c.length - k))
        splits["valid"].append((i, c.length - k, c.length))
    # Records that hold a window can be held out whole; the rest train (or are dropped by check_lengths).
    usable = [i for i in short if genome.contigs[i].length >= min_holdout]
    held = {}
    if len(usable) >= 3:
        n = max(1, round(holdout_frac * len(usable)))
        order = np.random.default_rng([seed, 97]).permutation(usable)
        held = {int(i): "valid" for i in order[:n]} | {int(i): "test" for i in order[n:2 * n]}
    for i in short:
        c = genome.contigs[i]
        splits[held.get(i, "train")].append((i, 0, c.length))
    info.update(rule="tail of each long contig" + (" + whole short records" if held else ""),
                holdout_frac=holdout_frac, tail_contigs=len(genome.contigs) - len(short),
                short_records=len(short), whole_records_valid=sum(v == "valid" for v in held.values()),
                whole_records_test=sum(v == "test" for v in held.values()), seed=seed)
    return splits


def _bed_splits(genome: Genome, bed: str) -> dict[str, list[Interval]]:
    p = Path(bed)
    if not p.is_file():
        raise UserError(f"--bed {bed}: no such file")
    splits = {s: [] for s in SPLITS}
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip() or line.startswith(("#", "track", "browser")):
            continue
        cols = line.split("\t") if "\t" in line else line.split()
        if len(cols) < 4:
            raise UserError(f"--bed {bed}:{n}: expected chrom, start, end, split; got {len(cols)} columns")
        chrom, start, end, split = cols[0], cols[1], cols[2], cols[3].strip().lower()
        i = genome.index_of(chrom)
        if i is None:
            raise UserError(f"--bed {bed}:{n}: contig {chrom!r} is not in the FASTA")
        try:
            s, e = int(start), int(end)
        except ValueError:
            raise UserError(f"--bed {bed}:{n}: start/end must be integers, got {start!r} {end!r}") from None
        if not 0 <= s < e <= genome.contigs[i].length:
            raise UserError(f"--bed {bed}:{n}: interval {s}-{e} outside {chrom} (length {genome.contigs[i].length})")
        if split not in _BED_SPLIT_NAMES:
            raise UserError(f"--bed {bed}:{n}: split must be train, valid or test, got {cols[3]!r}")
        splits[_BED_SPLIT_NAMES[split]].append((i, s, e))
    if not splits["train"]:
        raise UserError(f"--bed {bed}: no 'train' intervals")
    return splits


def check_lengths(genome: Genome, splits: dict[str, list[Interval]], window: int, skip_short: bool,
                  seq_len_flag: str = "--seq-len",
                  skip_flag: str | None = "--skip-short-records") -> dict[str, list[Interval]]:
    """Every interval must hold a whole window (or is dropped with --skip-short-records); each used split
    must keep at least one. The error names the caller's own flags: `seq_len_flag` sets the window, and
    `skip_flag` (None where the command has no such flag) would drop short records."""
    out = {}
    for split, intervals in splits.items():
        kept = []
        for (i, s, e) in intervals:
            if e - s >= window:
                kept.append((i, s, e))
            elif not skip_short:
                what = f"record {genome.contigs[i].name!r}" + (f" interval {s}-{e}" if (s, e) != (0, genome.contigs[i].length) else "")
                fix = f"a shorter {seq_len_flag}" + (f" or {skip_flag}" if skip_flag else "")
                raise UserError(f"{what} ({split}) has {e - s} bases, fewer than {seq_len_flag} + 1 = {window}; "
                                f"use {fix}")
        if intervals and not kept and split != "test":    # the test split is not used while training
            raise UserError(f"no {split} record is at least {seq_len_flag} + 1 = {window} bases long")
        out[split] = kept
    if not out.get("train"):
        raise UserError("no training sequence: every record is held out (check --val-contigs/--test-contigs)")
    return out


# --- windows ------------------------------------------------------------------------------------------------
class WindowSampler:
    """Random windows of one split, as a pure function of (seed, split, batch index, rank)."""

    def __init__(self, genome: Genome, intervals: list[Interval], split: str, seed: int, max_n_frac: float,
                 keep_softmask: bool = False):
        self.genome, self.intervals, self.split, self.seed = genome, intervals, split, seed
        self.max_n_frac, self.keep_softmask = max_n_frac, keep_softmask

    def _starts(self, window: int) -> np.ndarray:
        return np.cumsum([max(0, e - s - window + 1) for (_, s, e) in self.intervals])

    def windows(self, batch_index: int, batch_size: int, window: int, rank: int = 0, rc_augment: bool = False,
                tries: int = 16) -> np.ndarray:
        """(batch_size, window) token ids, uint8. Offsets are uniform over every valid start of the split (so
        long contigs are sampled in proportion to their length); a window with more than max_n_frac N is
        redrawn (up to `tries` times, then the least-N draw is kept)."""
        rng = np.random.default_rng([self.seed, _SPLIT_SALT[self.split], batch_index, rank])
        cum = self._starts(window)
        draws = rng.integers(0, cum[-1], (tries, batch_size))        # every candidate offset, drawn up front
        k = np.searchsorted(cum, draws, side="right")
        iv = np.array(self.intervals, dtype=np.int64)[k]             # (tries, batch, 3)
        contig = iv[..., 0]
        start = iv[..., 1] + draws - np.where(k > 0, cum[np.maximum(k - 1, 0)], 0)
        out = np.empty((batch_size, window), dtype=np.uint8)
        best_n = np.full(batch_size, 2.0)
        todo = np.arange(batch_size)
        for t in range(tries):                                       # redraw only windows with too many N
            ids = tok.encode_bytes(self.genome.fetch_many(contig[t, todo], start[t, todo], window), self.keep_softmask)
            n_frac = (ids == tok.N).mean(1)
            better = n_frac < best_n[todo]
            out[todo[better]], best_n[todo[better]] = ids[better], n_frac[better]
            todo = todo[best_n[todo] > self.max_n_frac]
            if not len(todo):
                break
        if rc_augment:
            flip = rng.random(batch_size) < 0.5
            out[flip] = tok.reverse_complement(out[flip])
        return out


def target_ids(ids: np.ndarray) -> np.ndarray:
    """Ids as prediction targets (int64): upper-case ids, with N and specials IGNORE_INDEX."""
    target = tok.unmask(ids).astype(np.int64)
    target[(target < tok.A) | (target == tok.N)] = tok.IGNORE_INDEX
    return target


def causal_batch(ids: np.ndarray) -> dict[str, torch.Tensor]:
    """Next-base prediction: inputs ids[:, :-1], targets ids[:, 1:] with N (and specials) ignored."""
    return {"input_ids": torch.from_numpy(np.ascontiguousarray(ids[:, :-1])),
            "targets": torch.from_numpy(target_ids(ids[:, 1:]))}


def mlm_batch(ids: np.ndarray, rng: np.random.Generator, mask_prob: float = 0.15) -> dict[str, torch.Tensor]:
    """BERT masking over real bases only: 15% chosen; of those 80% -> [MASK], 10% -> a random base drawn
    from ACGT (never a special or N), 10% unchanged. Only chosen positions are scored."""
    ids = ids[:, :-1].copy()
    base = tok.unmask(ids)
    real = (base >= tok.A) & (base < tok.N)
    chosen = real & (rng.random(ids.shape) < mask_prob)
    r = rng.random(ids.shape)
    ids[chosen & (r < 0.8)] = tok.MASK
    swap = chosen & (r >= 0.8) & (r < 0.9)
    ids[swap] = rng.integers(tok.A, tok.T + 1, int(swap.sum()), dtype=np.uint8)
    target = np.where(chosen, base.astype(np.int64), tok.IGNORE_INDEX)
    return {"input_ids": torch.from_numpy(ids), "targets": torch.from_numpy(target)}


def seq_len_at(step: int, seq_len: int, warmup_steps: int, start_len: int = 1024) -> int:
    """Sequence-length warmup (HyenaDNA-style): double from `start_len` to `seq_len` in equal stages over
    `warmup_steps` steps; constant `seq_len` afterwards or when disabled."""
    if warmup_steps <= 0 or step >= warmup_steps or start_len >= seq_len:
        return seq_len
    stages = int(np.ceil(np.log2(seq_len / start_len))) + 1
    stage = step * stages // warmup_steps
    return min(seq_len, start_len << stage)


class WindowBatches(torch.utils.data.Dataset):
    """Item i = batch i of this rank (rank r of `world` ranks draws its own stream)."""

    def __init__(self, sampler: WindowSampler, batch_size: int, seq_len: int, objective: str = "causal",
                 rank: int = 0, rc_augment: bool = False, seq_len_warmup_steps: int = 0,
                 seq_len_warmup_start: int = 1024, length: int | None = None):
        self.sampler, self.batch_size, self.seq_len, self.objective = sampler, batch_size, seq_len, objective
        self.rank, self.rc_augment, self.length = rank, rc_augment, length
        self.warmup_steps, self.warmup_start = seq_len_warmup_steps, seq_len_warmup_start

    def __len__(self) -> int:
        return self.length if self.length is not None else 2**62

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        L = seq_len_at(index, self.seq_len, self.warmup_steps, self.warmup_start)
        # During the warmup a step holds as many bases as after it (more, shorter windows): the learning rate
        # schedule and the bases seen per step stay those of the run.
        n_windows = self.batch_size * (self.seq_len // L)
        ids = self.sampler.windows(index, n_windows, L + 1, rank=self.rank, rc_augment=self.rc_augment)
        if self.objective == "mlm":
            batch = mlm_batch(ids, np.random.default_rng([self.sampler.seed, 101, index, self.rank]))
        else:
            batch = causal_batch(ids)
        batch["index"] = torch.tensor(index)
        return batch


class StepRange(torch.utils.data.Sampler):
    """Batch indices start, start+1, ..., stop-1: the loader's position is the global step, nothing else.

    Its length is `stop`, not stop - start: a resumed Lightning run continues its single epoch at batch
    `start` (restored progress) and must not see the epoch end early."""

    def __init__(self, start: int, stop: int):
        self.start, self.stop = start, stop

    def __iter__(self):
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop
