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
    # The per-base annotation of the held-out contig describes the FASTA's bases and reproduces the curve.
    with np.load(fasta.with_name(demo.LONG_RANGE_ANNOTATION)) as notes:
        assert sorted(notes) == ["chr20/background_entropy", "chr20/bases", "chr20/copy_distance", "chr20/entropy"]
        lines = fasta.read_text().split(">chr20")[1].splitlines()[1:]
        assert np.frombuffer(b"ACGT", dtype=np.uint8)[notes["chr20/bases"]].tobytes() == "".join(lines).encode()
        dist, ent, bg = notes["chr20/copy_distance"], notes["chr20/entropy"], notes["chr20/background_entropy"]
        assert np.isclose(np.where((dist > 0) & (dist < 4096), ent, bg).mean(),
                          meta["bits_per_base_at_context"]["chr20"]["4096"])


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
    # Every scored base is of one kind; in-view copies are predictable down to the substitution entropy.
    for r in result["rows"]:
        kinds = r["bits_by_kind"]
        assert sum(k["bases"] for k in kinds.values()) == max(1, 512 // r["context"]) * (r["context"] - 1)
        in_view = kinds["copy, source in view"]
        if in_view["bases"]:
            assert np.isclose(in_view["generator_best_bits"], demo._mutation_entropy(demo.LONG_RANGE_DIVERGENCE))
        assert all(k["model_bits"] > 0 for k in kinds.values() if k["bases"])
