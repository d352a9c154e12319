"""The context-length genomes (genomics.demo.long_range_genome: copies; regional_genome: every region its own
chain) and the context sweep over them (benchmarks/dna_context.py) at CPU size: the code path, not the
accuracy."""
import dataclasses
import json

import numpy as np
import yaml

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
    cfg = ContextSweepConfig(contexts=[64, 256], tokens_per_step=512, steps=2, genome="copies", genome_scale=1e-3,
                             device="cpu",
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


# --- the regional genome: every region its own chain --------------------------------------------------------
def brute_force_bayes(seq, region, C, order, alpha, windows=True):
    """regional_best_bits written as its definition, one base at a time."""
    out = []
    for i in range(len(seq)):
        rs = i
        while rs > 0 and region[rs - 1] == region[i]:
            rs -= 1
        first = max((i // C) * C if windows else max(i - C, 0), rs) + order
        if i < first:
            out.append(2.0)
            continue
        ctx = tuple(seq[i - order:i])
        n_ctx = sum(tuple(seq[j - order:j]) == ctx for j in range(first, i))
        n_pair = sum(tuple(seq[j - order:j]) == ctx and seq[j] == seq[i] for j in range(first, i))
        out.append(-np.log2((n_pair + alpha) / (n_ctx + 4 * alpha)))
    return np.array(out)


def test_the_regional_bayes_predictor_counts_only_what_it_sees_of_the_region():
    rng = np.random.default_rng(1)
    seq, ent, region = demo.regional_chain(rng, [150, 40, 210], order=2, alpha=0.5)
    assert seq.shape == ent.shape == region.shape == (400,) and list(np.bincount(region)) == [150, 40, 210]
    assert np.all(ent[[0, 1, 150, 151, 190, 191]] == 2.0)        # a region's first `order` bases are uniform
    for C, windows in ((64, True), (128, True), (50, False)):
        fast = demo.regional_best_bits(seq, region, C, order=2, alpha=0.5, windows=windows)
        assert np.allclose(fast, brute_force_bayes(seq, region, C, 2, 0.5, windows)), (C, windows)


def test_the_regional_genome_rewards_a_longer_context_and_annotates_its_held_out_bases(tmp_path):
    contexts = (256, 1024, 4096)
    regions = demo.Regions(order=2, lengths=(8_000, 30_000))
    fasta = demo.regional_genome(tmp_path, contigs={"chr1": 40_000, "chr20": 60_000}, contexts=contexts,
                                 regions=regions)
    meta = json.loads(fasta.with_name("demo.entropy.json").read_text())
    h = meta["bits_per_base"]["chr20"]
    for curve in ("bits_per_base_at_context", "bits_per_base_in_windows"):
        bits = [meta[curve]["chr20"][str(c)] for c in contexts]
        assert 2.0 > bits[0] > bits[1] > bits[2] > h, (curve, bits, h)
    assert meta["regions"]["order"] == 2 and meta["regions_per_contig"]["chr20"] >= 2
    with np.load(fasta.with_name(demo.REGIONAL_ANNOTATION)) as notes:
        lines = fasta.read_text().split(">chr20")[1].splitlines()[1:]
        assert np.frombuffer(b"ACGT", dtype=np.uint8)[notes["chr20/bases"]].tobytes() == "".join(lines).encode()
        best = demo.regional_best_bits(notes["chr20/bases"], notes["chr20/region"], 1024, order=int(notes["order"]),
                                       alpha=float(notes["alpha"]))
        assert np.isclose(best.mean(), meta["bits_per_base_in_windows"]["chr20"]["1024"])
    assert demo.regional_genome(tmp_path, contigs={"chr1": 40_000, "chr20": 60_000}, contexts=contexts,
                                regions=regions) == fasta


def test_the_regional_sweep_splits_the_bits_by_offset_and_keeps_genomes_apart(tmp_path):
    import pytest

    from benchmarks.dna_context import ContextSweepConfig, main
    from ssm_core.errors import UserError
    cfg = ContextSweepConfig(contexts=[64, 256], tokens_per_step=512, steps=2, genome_scale=1e-3, device="cpu",
                             val_tokens=512, out_dir=str(tmp_path / "sweep"), cache_dir=str(tmp_path / "cache"))
    result = main(cfg)
    for r in result["rows"]:
        split = r["bits_by_offset"]
        bins = split["by_offset"]
        assert bins[0]["offsets"][0] == 1 and bins[-1]["offsets"][1] == r["context"] - 1
        assert sum(b["bases"] for b in bins) == split["all"]["bases"] == max(1, 512 // r["context"]) * (r["context"] - 1)
        assert all(b["model_bits"] > 0 and b["generator_best_bits"] > 0 for b in bins)
    saved = json.loads((tmp_path / "sweep/dna_context.json").read_text())
    assert saved["config"]["genome"] == "regional" and saved["config"]["model"]["d_model"] == cfg.model.d_model
    # A sweep of the other genome in the same folder would read these runs as its own: refused.
    with pytest.raises(UserError, match="ctx64 was trained on .*regional.*, not on this sweep's genome"):
        main(ContextSweepConfig(**{**vars(cfg), "genome": "copies"}))
    # ... and so would a sweep of another model.
    other = dataclasses.replace(cfg.model, d_state=4)
    with pytest.raises(UserError, match="ctx64 was trained with other settings \\(--model.d_state 8\\)"):
        main(ContextSweepConfig(**{**vars(cfg), "model": other}))
    # ... or of another seed (a second seed's sweep goes in its own folder, each run trained with that seed).
    with pytest.raises(UserError, match="ctx64 was trained with other settings \\(--seed 0\\)"):
        main(ContextSweepConfig(**{**vars(cfg), "seed": 1}))
    assert yaml.safe_load((tmp_path / "sweep/runs/ctx64/config.yaml").read_text())["seed"] == 0
    # A longer training contig is another genome: its own folder, the held-out contigs as long as before.
    longer = ContextSweepConfig(**{**vars(cfg), "train_scale": 3.0, "out_dir": str(tmp_path / "longer")})
    result = main(longer)
    genomes = {f.parent.name: f for f in (tmp_path / "cache").glob("regional-*/**/demo.fa.fai")}
    assert len(genomes) == 2
    sizes = [{line.split()[0]: int(line.split()[1]) for line in f.read_text().splitlines()} for f in genomes.values()]
    short, long_ = sorted(sizes, key=lambda d: d["chr1"])
    assert long_["chr1"] == 3 * short["chr1"] and long_["chr20"] == short["chr20"] and long_["chr21"] == short["chr21"]
    assert json.loads((tmp_path / "longer/dna_context.json").read_text())["config"]["train_scale"] == 3.0


def test_the_sweep_runs_on_a_real_genome_without_the_generator_columns(tmp_path, capsys):
    """--fasta: any FASTA (held out by genomics.pretrain's rule or --val-contigs), no generator to compare with."""
    import numpy as np
    import pytest

    from benchmarks.dna_context import ContextSweepConfig, main
    from genomics.demo import write_fasta
    from ssm_core.errors import UserError
    rng = np.random.default_rng(0)
    fasta = tmp_path / "g.fa"
    write_fasta(fasta, [(name, bytes(rng.choice(list(b"ACGT"), n))) for name, n in (("2L", 6000), ("2R", 1500), ("3L", 1500))])
    cfg = ContextSweepConfig(contexts=[64, 256], tokens_per_step=512, steps=2, device="cpu", val_tokens=512,
                             fasta=[str(fasta)], val_contigs=["2R"], test_contigs=["3L"], out_dir=str(tmp_path / "sweep"))
    result = main(cfg)
    assert [r["context"] for r in result["rows"]] == [64, 256] and result["generator_bits_per_base"] is None
    assert all("generator_best_in_windows" not in r and "bits_by_offset" not in r for r in result["rows"])
    saved = json.loads((tmp_path / "sweep/dna_context.json").read_text())
    assert saved["genome"]["holdout"]["val_contigs"] == ["2R"] and saved["genome"]["fasta"] == [str(fasta)]
    assert (tmp_path / "sweep/dna_context.png").is_file()
    assert "| context | batch | held-out bits/base | bases/s |" in capsys.readouterr().out
    assert main(cfg)["rows"] == result["rows"]                  # finished contexts are read back, not retrained
    with pytest.raises(ValueError, match="--val-contigs / --test-contigs: only with --fasta"):
        ContextSweepConfig(val_contigs=["2R"])
    with pytest.raises(UserError, match=f"--fasta {tmp_path / 'nope.fa'}: no such file"):
        main(ContextSweepConfig(**{**vars(cfg), "fasta": [str(tmp_path / "nope.fa")], "out_dir": str(tmp_path / "x")}))
    assert not (tmp_path / "x").exists()
    (tmp_path / "notes.txt").write_text("not a genome\n")
    with pytest.raises(UserError, match="notes.txt: not a FASTA"):
        main(ContextSweepConfig(**{**vars(cfg), "fasta": [str(tmp_path / "notes.txt")], "out_dir": str(tmp_path / "x")}))
    assert not (tmp_path / "x").exists()
