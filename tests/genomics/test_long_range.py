"""The long-range genome (genomics.demo.long_range_genome) and the context sweep over it
(benchmarks/dna_context.py) at CPU size: the code path, not the accuracy."""
import json

import numpy as np

from genomics import demo


def test_copies_sit_at_their_distance_with_the_documented_divergence():
    rng = np.random.default_rng(0)
    table = demo.markov_table(rng)
    seq, ent, dist, bg = demo.long_range_contig(rng, 200_000, table, distances=(1_000, 50_000))
    copied = np.flatnonzero(dist)
    assert 0.3 < copied.size / seq.size < 0.6          # about copy_frac of the segments (early ones cannot copy)
    assert dist[copied].min() >= 1_000 and dist[copied].max() <= 50_000
    same = (seq[copied] == seq[copied - dist[copied]]).mean()
    assert abs((1 - same) - demo.LONG_RANGE_DIVERGENCE) < 0.02      # a copied base differs at the divergence rate
    assert np.allclose(ent[copied], demo._mutation_entropy(demo.LONG_RANGE_DIVERGENCE))
    assert np.array_equal(ent[dist == 0], bg[dist == 0])


def test_the_generators_best_falls_with_context_towards_its_entropy(tmp_path):
    contexts = (1024, 4096, 16384)
    fasta = demo.long_range_genome(tmp_path, contigs={"chr1": 60_000, "chr20": 60_000}, contexts=contexts)
    meta = json.loads(fasta.with_name("demo.entropy.json").read_text())
    h = meta["bits_per_base"]["chr20"]
    for curve in ("bits_per_base_at_context", "bits_per_base_in_windows"):
        bits = [meta[curve]["chr20"][str(c)] for c in contexts]
        assert bits[0] > bits[1] > bits[2] > h, (curve, bits, h)
    assert demo.long_range_genome(tmp_path, contigs={"chr1": 60_000, "chr20": 60_000}, contexts=contexts) == fasta


def test_context_sweep_runs_every_context_and_resumes(tmp_path):
    from benchmarks.dna_context import ContextSweepConfig, main
    cfg = ContextSweepConfig(contexts=[64, 256], tokens_per_step=512, steps=2, genome_scale=1e-3, device="cpu",
                             val_tokens=512, out_dir=str(tmp_path / "sweep"), cache_dir=str(tmp_path / "cache"))
    result = main(cfg)
    assert [r["context"] for r in result["rows"]] == [64, 256] and [r["batch_size"] for r in result["rows"]] == [8, 2]
    assert all(r["train_tokens"] == 2 * 512 for r in result["rows"])     # equal tokens per step at every context
    saved = json.loads((tmp_path / "sweep/dna_context.json").read_text())
    assert saved["rows"] == result["rows"] and (tmp_path / "sweep/dna_context.png").is_file()
    assert main(cfg)["rows"] == result["rows"]       # finished contexts are read back, not retrained
