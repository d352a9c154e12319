"""Tokenizer, FASTA reading (plain, read-only folder, gzip, GenBank, bgzip), splits, windows, objectives."""
import gzip

import numpy as np
import pytest

from genomics import tokenizer as tok
from genomics.data import (
    Genome,
    WindowBatches,
    WindowSampler,
    causal_batch,
    check_lengths,
    make_splits,
    mlm_batch,
    seq_len_at,
)
from genomics.demo import write_fasta
from ssm_core.cli import UserError


def random_dna(rng, n, alphabet=b"ACGTacgtN"):
    return bytes(rng.choice(np.frombuffer(alphabet, dtype=np.uint8), n))


@pytest.fixture
def fasta(tmp_path):
    rng = np.random.default_rng(0)
    recs = [("chr1", random_dna(rng, 5000)), ("chr2", random_dna(rng, 3001)), ("chr20", random_dna(rng, 2000)),
            ("chr21", random_dna(rng, 1500))]
    path = tmp_path / "g.fa"
    # Written by hand (line width 70, no .fai) so pyfaidx has to index it.
    path.write_bytes(b"".join(b">" + n.encode() + b" description\n" +
                              b"".join(s[i:i + 70] + b"\n" for i in range(0, len(s), 70)) for n, s in recs))
    return path, dict(recs)


def test_tokenizer_ids_case_iupac_and_rc():
    ids = tok.encode_bytes("ACGTNacgtRYn-")
    assert ids.tolist() == [7, 8, 9, 10, 11, 7, 8, 9, 10, 11, 11, 11, 11]
    soft = tok.encode_bytes("ACgt", keep_softmask=True)
    assert soft.tolist() == [7, 8, 14, 15]
    assert tok.unmask(soft).tolist() == [7, 8, 9, 10]
    assert tok.decode(tok.reverse_complement(tok.encode_bytes("AACGTN"))) == "NACGTT"
    x = np.random.default_rng(1).integers(0, 16, (3, 50)).astype(np.uint8)
    assert np.array_equal(tok.reverse_complement(tok.reverse_complement(x)), x)
    comp = tok.complement_map(16)
    assert [comp[i] for i in (7, 8, 9, 10, 11, 12, 15, 3)] == [10, 9, 8, 7, 11, 15, 12, 3]


def test_fetch_matches_pyfaidx_and_index_is_written(fasta):
    import pyfaidx
    path, recs = fasta
    g = Genome.open([path])
    assert (path.parent / "g.fa.fai").is_file()
    assert [c.name for c in g.contigs] == ["chr1", "chr2", "chr20", "chr21"]
    fa = pyfaidx.Fasta(str(path))
    rng = np.random.default_rng(2)
    for _ in range(50):
        i = int(rng.integers(4))
        c = g.contigs[i]
        s = int(rng.integers(0, c.length - 1))
        e = int(rng.integers(s + 1, c.length + 1))
        assert g.fetch(i, s, e).tobytes() == recs[c.name][s:e]
        assert g.fetch(i, s, e).tobytes().decode() == str(fa[c.name][s:e])


def test_read_only_folder_indexes_into_cache(fasta, tmp_path, monkeypatch):
    import genomics.data
    path, recs = fasta
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "g.fa").write_bytes(path.read_bytes())
    # chmod cannot stop root (CI may run as root), so the permission check itself is what is faked.
    monkeypatch.setattr(genomics.data, "_writable", lambda folder: folder != ro)
    g = Genome.open([ro / "g.fa"], cache_dir=tmp_path / "cache")
    assert not (ro / "g.fa.fai").exists() and g.fais[0].is_relative_to(tmp_path / "cache")
    assert g.fetch(1, 10, 20).tobytes() == recs["chr2"][10:20]


def test_gzip_genbank_and_bgzip_are_read(fasta, tmp_path):
    from Bio import SeqIO, bgzf
    from Bio.Seq import Seq
    from Bio.SeqRecord import SeqRecord
    path, recs = fasta
    gz = tmp_path / "g.fa.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    gb = tmp_path / "g.gb"
    SeqIO.write([SeqRecord(Seq(recs["chr2"].decode().upper()), id="chr2", annotations={"molecule_type": "DNA"})],
                gb, "genbank")
    bgz = tmp_path / "b.fa.gz"
    with bgzf.BgzfWriter(str(bgz)) as w:
        w.write(path.read_bytes())
    for p, name, want in ((gz, "chr1", recs["chr1"]), (gb, "chr2", recs["chr2"].upper()), (bgz, "chr20", recs["chr20"])):
        g = Genome.open([p], cache_dir=tmp_path / "cache")
        i = g.index_of(name)
        assert g.fetch(i, 100, 900).tobytes() == want[100:900], p
    assert not Genome.open([bgz], cache_dir=tmp_path / "cache").paths[0].is_relative_to(tmp_path / "cache")


def test_bad_files_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        Genome.open([tmp_path / "missing.fa"])
    (tmp_path / "empty.fa").write_text("")
    with pytest.raises(UserError, match="not a FASTA"):
        Genome.open([tmp_path / "empty.fa"])
    (tmp_path / "headers.fa").write_text(">a\n>b\n")
    with pytest.raises(UserError, match="no sequence records"):
        Genome.open([tmp_path / "headers.fa"])


def test_splits_contigs_auto_and_bed(fasta, tmp_path):
    path, _ = fasta
    g = Genome.open([path])
    auto = make_splits(g, None, None)                   # chr20/chr21 present: hg38 defaults
    assert [g.contigs[i].name for i, _, _ in auto["valid"]] == ["chr20"]
    assert [g.contigs[i].name for i, _, _ in auto["test"]] == ["chr21"]
    assert len(auto["train"]) == 2
    with pytest.raises(UserError, match="chrX"):
        make_splits(g, ["chrX"], None)
    bed = tmp_path / "s.bed"
    bed.write_text("chr1\t0\t4000\ttrain\nchr2\t0\t3000\tvalid\nchr1\t4000\t5000\ttest\n")
    sp = make_splits(g, None, None, bed=str(bed))
    assert sp["train"] == [(0, 0, 4000)] and sp["valid"] == [(1, 0, 3000)] and sp["test"] == [(0, 4000, 5000)]
    bed.write_text("chr1\t0\t99999\ttrain\n")
    with pytest.raises(UserError, match="outside chr1"):
        make_splits(g, None, None, bed=str(bed))
    with pytest.raises(UserError, match="fewer than --seq-len.*--skip-short-records"):
        check_lengths(g, auto, 1600, skip_short=False)  # chr21 has 1500 bases
    # A command without --skip-short-records (genomics.evaluate) is told only about its own flag.
    with pytest.raises(UserError, match=r"use a shorter --context-lengths$"):
        check_lengths(g, auto, 1600, skip_short=False, seq_len_flag="--context-lengths", skip_flag=None)
    kept = check_lengths(g, auto, 1600, skip_short=True)
    assert kept["test"] == [] and len(kept["train"]) == 2


def test_windows_are_a_function_of_the_index_and_cover_the_genome(fasta):
    path, _ = fasta
    g = Genome.open([path])
    sp = make_splits(g, ["chr20"], ["chr21"])
    s = WindowSampler(g, sp["train"], "train", seed=3, max_n_frac=1.0)
    a, b = s.windows(7, 4, 65), s.windows(7, 4, 65)
    assert np.array_equal(a, b) and not np.array_equal(a, s.windows(8, 4, 65))
    assert not np.array_equal(s.windows(7, 4, 65, rank=1), a)
    # Offsets are uniform over all valid starts: windows come from both training contigs and from far
    # into them, not only from their first bases.
    contigs = [g.fetch(ci, 0, g.contigs[ci].length).tobytes().upper() for ci in (0, 1)]
    starts = set()
    for k in range(40):
        for w in s.windows(k, 8, 65):
            for ci, seq in enumerate(contigs):
                pos = seq.find(tok.decode(w).encode())
                if pos >= 0:
                    starts.add((ci, pos // 1000))
    assert {ci for ci, _ in starts} == {0, 1} and max(p for _, p in starts) >= 3


def test_n_filter_redraws_windows(tmp_path):
    seq = b"N" * 500 + b"ACGT" * 125
    path = write_fasta(tmp_path / "n.fa", [("c", seq), ("v", b"ACGT" * 100)])
    g = Genome.open([path])
    s = WindowSampler(g, [(0, 0, len(seq))], "train", seed=0, max_n_frac=0.2)
    w = s.windows(0, 16, 50)
    assert ((w == tok.N).mean(1) <= 0.2).all()


def test_causal_and_mlm_batches():
    rng = np.random.default_rng(0)
    ids = tok.encode_bytes(random_dna(rng, 20001, b"ACGTN")).reshape(1, -1)
    b = causal_batch(ids)
    assert b["input_ids"].shape == (1, 20000)
    t = b["targets"].numpy()[0]
    assert ((t == tok.IGNORE_INDEX) == (ids[0, 1:] == tok.N)).all()
    m = mlm_batch(ids, np.random.default_rng(1))
    x, t = m["input_ids"].numpy()[0], m["targets"].numpy()[0]
    orig = ids[0, :-1]
    chosen = t != tok.IGNORE_INDEX
    real = orig != tok.N
    assert not (chosen & ~real).any()                    # N is never a target
    assert abs(chosen.sum() / real.sum() - 0.15) < 0.02
    masked, swapped, kept = x[chosen] == tok.MASK, (x[chosen] != tok.MASK) & (x[chosen] != orig[chosen]), x[chosen] == orig[chosen]
    assert abs(masked.mean() - 0.8) < 0.04
    assert ((x[chosen][swapped] >= tok.A) & (x[chosen][swapped] <= tok.T)).all()   # replacements: ACGT only
    assert abs((swapped.mean() + kept.mean()) - 0.2) < 0.04 and kept.mean() > 0.05 - 0.03
    assert (x[~chosen] == orig[~chosen]).all() and (t[chosen] == orig[chosen]).all()


def test_seq_len_warmup_and_batches(fasta):
    assert [seq_len_at(s, 4096, 100, 1024) for s in (0, 40, 70, 100)] == [1024, 2048, 4096, 4096]
    path, _ = fasta
    g = Genome.open([path])
    ds = WindowBatches(WindowSampler(g, [(0, 0, 5000)], "train", 0, 1.0), 2, 256, seq_len_warmup_steps=10,
                       seq_len_warmup_start=64)
    # Equal bases per step through the warmup: 8 windows of 64, then 2 of 256.
    assert ds[0]["input_ids"].shape == (8, 64) and ds[10]["input_ids"].shape == (2, 256)


def test_auto_holdout_without_hg38_names(tmp_path):
    path = write_fasta(tmp_path / "x.fa", [("a", b"ACGT" * 1250), ("b", b"ACGT" * 200)])
    g = Genome.open([path])
    sp = make_splits(g, None, None, min_holdout=300)
    # the long record gives up one window each to valid (its end) and test (just before); the short one trains
    assert sp["valid"] == [(0, 4700, 5000)] and sp["test"] == [(0, 4400, 4700)]
    assert sp["train"] == [(0, 0, 4400), (1, 0, 800)]
    assert check_lengths(g, sp, 300, skip_short=False)["valid"] == [(0, 4700, 5000)]
