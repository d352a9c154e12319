"""genomics.score (VCF -> log-likelihood ratios), streaming evaluate / embed, and the whole-record hold-out
for FASTAs of many short records. Tiny random models saved as genomics.pretrain would: quick on a CPU."""
from __future__ import annotations

import gzip
import json
import math

import numpy as np
import pytest
import torch

from genomics import tokenizer as tok
from genomics.data import Genome, causal_batch, check_lengths, make_splits
from genomics.demo import write_fasta
from genomics.embed import EmbedConfig
from genomics.embed import main as embed_main
from genomics.evaluate import EvaluateConfig
from genomics.evaluate import main as evaluate_main
from genomics.lightning_module import LN2, model_inputs, token_stats
from genomics.score import ScoreConfig, causal_suffix_loglik
from genomics.score import main as score_main
from ssm_core import MambaConfig, MambaLM
from ssm_core.cli import run
from ssm_core.io import write_json_atomic

from ..helpers import REPO

HEADER = "##fileformat=VCFv4.2\n##contig=<ID=chr1,length=3000>\n#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\n"


def save_tiny(folder, objective="causal", rc=False, softmask=False, seed=0):
    torch.manual_seed(seed)
    model = MambaLM(MambaConfig(d_model=16, n_layer=2, d_state=4, expand=1, rc_equivariant=rc,
                                **model_inputs(softmask, rc)))
    with torch.no_grad():        # weights away from init, so that the logits depend on the context
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    model.save_pretrained(folder / "model")
    write_json_atomic(folder / "model" / "genomics.json", {"objective": objective, "seq_len": 64,
                                                           "keep_softmask": softmask, "fasta": [],
                                                           "val_contigs": ["chr1"]})
    return model.eval()


@pytest.fixture(scope="module")
def fasta(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ref")
    rng = np.random.default_rng(3)
    seq = np.frombuffer(b"ACGT", dtype=np.uint8)[rng.integers(0, 4, 3000)].copy()
    seq[1000:1010] += 32      # soft-masked stretch
    seq[2500:2520] = ord("N")
    return write_fasta(folder / "ref.fa", [("chr1", seq.tobytes()), ("chr2", b"ACGT" * 50)])


@pytest.fixture(scope="module")
def causal(tmp_path_factory):
    folder = tmp_path_factory.mktemp("causal")
    return folder, save_tiny(folder)


def ref_base(fasta, pos):
    return Genome.open([fasta]).fetch(0, pos - 1, pos).tobytes().decode().upper()


def read_scores(path):
    rows = [line.split("\t") for line in path.read_text().splitlines()[1:]]
    return [dict(zip(["chrom", "pos", "id", "ref", "alt", "score", "note"], r)) for r in rows]


def test_score_vcf_values_and_per_record_notes(fasta, causal, tmp_path):
    folder, model = causal
    b = ref_base(fasta, 300)
    alt = "ACGT"[("ACGT".index(b) + 1) % 4]
    wrong = "ACGT"[("ACGT".index(ref_base(fasta, 400)) + 2) % 4]
    lines = [f"chr1\t300\tsnv\t{b}\t{alt}\t.\tPASS\t.",
             f"1\t300\tnochr\t{b}\t{alt}\t.\tPASS\t.",                  # contig named without 'chr'
             f"chr1\t400\tbadref\t{wrong}\tA\t.\tPASS\t.",
             f"chr1\t500\tmulti\t{ref_base(fasta, 500)}\tA,C\t.\tPASS\t.",
             f"chr1\t600\tsym\t{ref_base(fasta, 600)}\t<DEL>\t.\tPASS\t.",
             f"chr1\t700\tins\t{ref_base(fasta, 700)}\t{ref_base(fasta, 700)}GT\t.\tPASS\t.",
             "chrX\t10\tunknown\tA\tC\t.\tPASS\t."]
    vcf = tmp_path / "v.vcf"
    vcf.write_text(HEADER.replace("#CHROM", "##contig=<ID=1,length=3000>\n##contig=<ID=chrX,length=99>\n#CHROM")
                   + "\n".join(lines) + "\n")
    out = tmp_path / "out" / "s.tsv"
    assert run(score_main, ScoreConfig, ["--checkpoint", str(folder), "--fasta", str(fasta), "--vcf", str(vcf),
                                         "--output", str(out), "--context-length", "64"], prog="t") == 0
    rows = {r["id"]: r for r in read_scores(out)}
    assert list(rows) == ["snv", "nochr", "badref", "multi", "sym", "ins", "unknown"]
    assert rows["snv"]["score"] and rows["snv"]["note"] == ""
    assert rows["nochr"]["score"] == rows["snv"]["score"] and "read as chr1" in rows["nochr"]["note"]
    assert rows["badref"]["score"] == "" and "does not match the FASTA" in rows["badref"]["note"]
    assert rows["multi"]["score"] == "" and "multi-allelic" in rows["multi"]["note"]
    assert rows["sym"]["score"] == "" and "symbolic" in rows["sym"]["note"]
    assert rows["ins"]["score"] != ""
    assert rows["unknown"]["score"] == "" and "not in the FASTA" in rows["unknown"]["note"]
    # The SNV's score is log P(alt window) - log P(ref window) under the model, computed here directly.
    g = Genome.open([fasta])
    ref_ids = tok.encode_bytes(g.fetch(0, 299 - 32, 299 + 32))
    alt_ids = ref_ids.copy()
    alt_ids[32] = tok.encode_bytes(alt)[0]
    with torch.no_grad():
        def total(ids):
            b = causal_batch(ids[None])
            return -float(token_stats(model(b["input_ids"].long()), b["targets"])[0].detach())
    assert float(rows["snv"]["score"]) == pytest.approx(total(alt_ids) - total(ref_ids), abs=2e-4)


def test_suffix_loglik_counts_only_positions_from_the_variant(causal):
    _, model = causal
    ids = tok.encode_bytes("ACGTTGCAACGTGGCA")
    full, tail = causal_suffix_loglik(model, [(ids, 0), (ids, 9)], torch.device("cpu"), 4, False)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.from_numpy(ids[None, :-1]).long()), -1)[0]
    per_pos = logp[torch.arange(len(ids) - 1), torch.from_numpy(ids[1:]).long()].numpy()   # predicts 1..n-1
    assert full == pytest.approx(per_pos.sum(), abs=1e-4) and tail == pytest.approx(per_pos[8:].sum(), abs=1e-4)


def test_score_rc_equivariant_mlm_averages_strands(fasta, tmp_path):
    save_tiny(tmp_path / "rc", objective="mlm", rc=True)
    b = ref_base(fasta, 800)
    vcf = tmp_path / "v.vcf.gz"
    with gzip.open(vcf, "wt") as f:    # plain gzip; bgzip is read the same way
        f.write(HEADER + f"chr1\t800\ta\t{b}\t{'ACGT'[('ACGT'.index(b) + 1) % 4]}\t.\tPASS\t.\n"
                f"chr1\t900\tb\t{ref_base(fasta, 900)}\t{ref_base(fasta, 900)}A\t.\tPASS\t.\n")
    out = tmp_path / "s.tsv"
    assert run(score_main, ScoreConfig, ["--checkpoint", str(tmp_path / "rc"), "--fasta", str(fasta), "--vcf",
                                         str(vcf), "--output", str(out), "--context-length", "32"], prog="t") == 0
    rows = read_scores(out)
    assert rows[0]["score"] and math.isfinite(float(rows[0]["score"]))
    assert rows[1]["score"] == "" and "SNVs only" in rows[1]["note"]


@pytest.mark.parametrize("content,match", [
    ("not a vcf at all\n", "not a readable VCF"),
    (HEADER + "chr1\tnotanumber\t.\tA\tC\t.\tPASS\t.\n", "not a readable VCF"),
    (HEADER.replace("chr1", "chrZ") + "chrZ\t5\t.\tA\tC\t.\tPASS\t.\n", "none of its contigs"),
])
def test_score_bad_vcf_fails_in_one_line(fasta, causal, tmp_path, capsys, content, match):
    vcf = tmp_path / "bad.vcf"
    vcf.write_text(content)
    out = tmp_path / "s.tsv"
    rc = run(score_main, ScoreConfig, ["--checkpoint", str(causal[0]), "--fasta", str(fasta), "--vcf", str(vcf),
                                       "--output", str(out)], prog="t")
    err = capsys.readouterr().err.strip()
    assert rc == 2 and match in err and len(err.splitlines()) == 1 and not out.exists()


def test_score_missing_files_fail_cleanly(fasta, causal, tmp_path, capsys):
    for argv, match in ((["--vcf", str(tmp_path / "none.vcf"), "--fasta", str(fasta)], "no such file"),
                        (["--vcf", str(tmp_path / "none.vcf")], "go together")):
        assert run(score_main, ScoreConfig, ["--checkpoint", str(causal[0]), *argv], prog="t") == 2
        assert match in capsys.readouterr().err


def test_stream_evaluate_equals_one_window_over_the_contig(fasta, causal, tmp_path):
    folder, model = causal
    res = evaluate_main(EvaluateConfig(checkpoint=str(folder), fasta=[str(fasta)], contigs=["chr1"], stream=True,
                                       chunk=97, output_dir=str(tmp_path / "ev")))
    ids = tok.encode_bytes(Genome.open([fasta]).fetch(0, 0, 3000))
    b = causal_batch(ids[None])
    with torch.no_grad():
        nll, count, _ = token_stats(model(b["input_ids"].long()), b["targets"])
    row = res["stream"][0]
    assert row["scored_tokens"] == int(count) == 2999 - 20      # N targets left out
    assert row["bits_per_base"] == pytest.approx(float(nll) / float(count) / LN2, rel=1e-5)
    assert (tmp_path / "ev" / "evaluate_stream.png").is_file()
    assert json.loads((tmp_path / "ev" / "evaluate.json").read_text())["mode"] == "stream"


def test_stream_refused_for_models_that_see_the_future(fasta, tmp_path, capsys):
    save_tiny(tmp_path / "rc", objective="mlm", rc=True)
    assert run(evaluate_main, EvaluateConfig, ["--checkpoint", str(tmp_path / "rc"), "--fasta", str(fasta),
                                               "--contigs", "chr1", "--stream"], prog="t") == 2
    assert "cannot stream" in capsys.readouterr().err


def test_stream_embed_equals_one_window(fasta, causal, tmp_path):
    folder, _ = causal
    outs = {}
    for name, argv in (("stream", ["--stream", "--window", "101"]), ("window", ["--window", "4096"])):
        out = tmp_path / f"{name}.npy"
        assert run(embed_main, EmbedConfig, ["--checkpoint", str(folder), "--fasta", str(fasta),
                                             "--output", str(out), *argv], prog="t") == 0
        outs[name] = np.load(out)
    np.testing.assert_allclose(outs["stream"], outs["window"], rtol=1e-4, atol=1e-5)


def test_many_short_records_hold_out_whole_records(tmp_path):
    rng = np.random.default_rng(0)
    recs = [(f"r{i}", np.frombuffer(b"ACGT", dtype=np.uint8)[rng.integers(0, 4, 1500)].tobytes()) for i in range(60)]
    recs.append(("long", b"ACGT" * 25_000))
    g = Genome.open([write_fasta(tmp_path / "amplicons.fa", recs)])
    info = {}
    sp = make_splits(g, None, None, min_holdout=1025, seed=1, info=info)
    whole = {s: [i for i, a, b in sp[s] if (a, b) == (0, g.contigs[i].length)] for s in ("valid", "test")}
    assert len(whole["valid"]) == len(whole["test"]) == 3 and not set(whole["valid"]) & set(whole["test"])
    assert g.index_of("long") in [i for i, _, _ in sp["valid"]]      # the long contig keeps its tail rule
    train = {i for i, _, _ in sp["train"]}
    assert not train & (set(whole["valid"]) | set(whole["test"]))
    assert info["whole_records_valid"] == 3 and info["seed"] == 1 and "whole short records" in info["rule"]
    assert make_splits(g, None, None, min_holdout=1025, seed=1) == sp           # seeded: the same split again
    assert make_splits(g, None, None, min_holdout=1025, seed=2) != sp
    assert check_lengths(g, sp, 1025, skip_short=True)["valid"]


def test_stream_benchmark_runs_tiny_on_cpu(tmp_path):
    import subprocess
    import sys
    out = tmp_path / "bench.json"
    argv = ["--d-model", "16", "--n-layer", "1", "--contig-mb", "0.02", "--lengths-mb", "0.005", "--chunk", "2048",
            "--score-context", "128", "--score-variants", "4", "--device", "cpu", "--precisions", "float32",
            "--workdir", str(tmp_path), "--out", str(out)]
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "genomics_stream.py"), *argv], check=True,
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    res = json.loads(out.read_text())
    assert [r["bases"] for r in res["stream"]] == [5000, 20000] and res["contig_bases"] == 20000
    assert all(r["tokens_per_second"] > 0 and "error" not in r for r in res["stream"])
    assert res["score"][0]["scored"] == 4 and res["score"][0]["variants_per_second"] > 0
    assert "| stream, chunk 2,048 | float32 | 20,000 |" in proc.stdout     # the table BENCHMARKS.md shows


def test_pretrain_on_many_short_records_needs_no_val_contigs(tmp_path):
    from genomics.pretrain import PretrainConfig
    from genomics.pretrain import main as pretrain_main
    rng = np.random.default_rng(1)
    recs = [(f"gene{i}", np.frombuffer(b"ACGT", dtype=np.uint8)[rng.integers(0, 4, int(rng.integers(150, 350)))].tobytes())
            for i in range(80)]
    fa = write_fasta(tmp_path / "16s.fa", recs)
    out = tmp_path / "run"
    assert run(pretrain_main, PretrainConfig, ["--fasta", str(fa), "--seq-len", "128", "--skip-short-records",
                                               "--output-dir", str(out), "--max-steps", "2", "--batch-size", "2",
                                               "--model.d_model", "16", "--model.n_layer", "1", "--val-batches", "1",
                                               "--accelerator", "cpu", "--seed", "5"], prog="t") == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["holdout"]["whole_records_valid"] == 4 and m["holdout"]["seed"] == 5 and m["val_tokens"] > 0
    held = json.loads((out / "model" / "genomics.json").read_text())["val_contigs"]
    assert len(held) == 4 and all(h.startswith("gene") for h in held)


def test_planted_demo_variants_and_the_generator_ceiling():
    from genomics import demo
    rows = demo.planted_variants()
    motif = [r for r in rows if r["label"] == "motif"]
    assert len(motif) == len(rows) - len(motif) > 100
    g = Genome.open([demo.demo_genome()])
    for r in rows[::25]:     # REF is the demo FASTA's base
        assert g.fetch(g.index_of(r["contig"]), r["pos"], r["pos"] + 1).tobytes().decode() == r["ref"]
    llr = demo.generator_llr(rows)
    sites, motifs, _ = demo.generator_sites()
    for r, v in zip(rows, llr):
        if r["label"] == "motif":
            m = next(m for s, m in sites[r["contig"]][1] if s <= r["pos"] < s + motifs[m].shape[0])
            if r["motif_offset"] < motifs[m].shape[0] - 2:      # no chain base after it within reach
                assert v == pytest.approx(math.log((1 - demo.MOTIF_PWM_TOP) / 3 / demo.MOTIF_PWM_TOP))
    # The design: background SNVs sit where the generator's distribution is flat, so under the generator
    # they are near-neutral and a motif break (-4.6 nats) stands out; a model of the genome can separate them.
    from sklearn.metrics import roc_auc_score
    is_motif = np.array([r["label"] == "motif" for r in rows])
    assert np.median(np.abs(llr[~is_motif])) < 0.5 and llr[~is_motif].min() > -3.0
    assert roc_auc_score(is_motif, -llr) > 0.99
