"""Damaged FASTA input: corrupt gzip / BGZF data is one UserError, and an index we did not write survives."""
import gzip
import os

import numpy as np
import pytest

from genomics.data import Genome
from ssm_core.cli import UserError


def _fasta_bytes(n=20000, seed=0):
    seq = np.random.default_rng(seed).choice(np.frombuffer(b"ACGT", np.uint8), n).tobytes()
    return b">chr1\n" + b"".join(seq[i:i + 60] + b"\n" for i in range(0, n, 60))


def _corrupt(data: bytes, start=200, stop=400) -> bytes:
    b = bytearray(data)
    for i in range(start, min(stop, len(b) - 8)):
        b[i] ^= 0x5A
    return bytes(b)


def test_corrupt_gzip_is_one_user_error(tmp_path):
    bad = tmp_path / "bad.fa.gz"
    bad.write_bytes(_corrupt(gzip.compress(_fasta_bytes())))
    with pytest.raises(UserError, match=r"--fasta .*bad.fa.gz: cannot read as gzip \(Error -3 while decompressing"):
        Genome.open([bad], cache_dir=tmp_path / "cache")
    truncated = tmp_path / "trunc.fa.gz"
    truncated.write_bytes(gzip.compress(_fasta_bytes())[:3000])
    with pytest.raises(UserError, match="trunc.fa.gz: cannot read as"):
        Genome.open([truncated], cache_dir=tmp_path / "cache")


def test_corrupt_bgzf_is_one_user_error_and_leaves_no_index(tmp_path):
    from Bio import bgzf
    good = tmp_path / "good.fa.gz"
    with bgzf.BgzfWriter(str(good)) as w:
        w.write(_fasta_bytes())
    bad = tmp_path / "bad.fa.gz"
    bad.write_bytes(_corrupt(good.read_bytes(), 300, 500))
    with pytest.raises(UserError, match=r"bad.fa.gz: not a valid FASTA file \(Error -3"):
        Genome.open([bad], cache_dir=tmp_path / "cache")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.fa.gz", "good.fa.gz"]


@pytest.mark.parametrize("stale", [False, True])
def test_a_users_index_survives_a_fasta_that_fails_to_index(tmp_path, stale):
    fa = tmp_path / "dup.fa"
    fa.write_text(">a\nACGTACGT\n>a\nACGTTTTT\n")
    fai = tmp_path / "dup.fa.fai"
    fai.write_text("a\t8\t3\t8\t9\n")
    if stale:   # older than the FASTA: we rebuild it, which fails on the duplicate name
        os.utime(fai, (0, 0))
        with pytest.raises(UserError, match='dup.fa: not a valid FASTA file \\(Duplicate key "a"\\)'):
            Genome.open([fa], cache_dir=tmp_path / "cache")
    else:       # current: it is used as it is
        assert [c.name for c in Genome.open([fa], cache_dir=tmp_path / "cache").contigs] == ["a"]
    assert fai.read_text() == "a\t8\t3\t8\t9\n"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "cache") == ["dup.fa", "dup.fa.fai"]


def test_a_stale_index_is_rebuilt_in_place(tmp_path):
    fa = tmp_path / "g.fa"
    fa.write_bytes(_fasta_bytes(600))
    fai = tmp_path / "g.fa.fai"
    fai.write_text("chr1\t5\t6\t60\t61\n")
    os.utime(fai, (0, 0))
    g = Genome.open([fa], cache_dir=tmp_path / "cache")
    assert g.contigs[0].length == 600 and fai.read_text().startswith("chr1\t600\t")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "cache") == ["g.fa", "g.fa.fai"]
