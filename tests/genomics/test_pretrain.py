"""End to end on CPU with tiny shapes: pretrain (loss falls), exact mid-run resume, 2-process DDP (gloo),
bad input, and embed / evaluate / probe on the checkpoint."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from genomics import tokenizer as tok
from genomics.demo import write_fasta
from genomics.pretrain import PretrainConfig
from genomics.pretrain import main as pretrain_main
from ssm_core import MambaConfig, MambaLM
from ssm_core.cli import run

from ..helpers import REPO, child_env

TINY = ["--seq-len", "64", "--batch-size", "4", "--model.d_model", "16", "--model.n_layer", "1",
        "--val-batches", "2", "--accelerator", "cpu", "--optim.lr", "0.02", "--optim.warmup_steps", "2"]


@pytest.fixture(scope="module")
def genome(tmp_path_factory):
    """A small genome with learnable structure (a repeated motif-rich chain), written as FASTA."""
    folder = tmp_path_factory.mktemp("genome")
    rng = np.random.default_rng(0)
    unit = np.frombuffer(b"ACGT", dtype=np.uint8)[rng.integers(0, 4, 37)]
    def contig(n):   # periodic with 10% noise: a model can get far below 2 bits/base
        s = np.resize(unit, n).copy()
        hit = rng.random(n) < 0.1
        s[hit] = np.frombuffer(b"ACGT", dtype=np.uint8)[rng.integers(0, 4, hit.sum())]
        return s.tobytes()
    return write_fasta(folder / "toy.fa", [("chr1", contig(20000)), ("chr2", contig(8000)), ("chr20", contig(3000)),
                                           ("chr21", contig(3000))])


@pytest.fixture(scope="module")
def trained(genome, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    run_cli(pretrain_main, ["--fasta", str(genome), "--output-dir", str(out), "--max-steps", "30",
                                  "--val-every", "15", "--ckpt-every", "15", *TINY])
    return out


def run_cli(main, argv, config_cls=PretrainConfig):
    assert run(main, config_cls, argv, prog="test") == 0


def test_pretrain_loss_falls_and_writes_outputs(trained):
    m = json.loads((trained / "metrics.json").read_text())
    for key in ("val_loss", "val_bits_per_base", "val_accuracy", "train_tokens", "tokens_per_second"):
        assert key in m
    assert m["global_step"] == 30 and m["train_tokens"] == 30 * 4 * 64
    hist = torch.load(trained / "checkpoints" / "last.ckpt", weights_only=False)["genomics_history"]
    first_train = hist["train"][0][1]
    assert first_train > 3.0                                   # ~log2(12) at initialisation
    assert m["val_bits_per_base"] < first_train - 1.0          # and it learned
    assert (trained / "loss_curve.png").stat().st_size > 1000
    assert (trained / "checkpoints" / "best.ckpt").is_file()
    # the default feeds the soft-mask as input: lower-case ids 12-15 widen the vocabulary
    # a user's FASTA is upper-cased by default (the soft-mask is an input only for the demo genome)
    assert MambaLM.from_pretrained(trained / "model").config.vocab_size == tok.VOCAB_SIZE


def _weights(ckpt: Path) -> dict:
    return torch.load(ckpt, weights_only=False)["state_dict"]


def test_resume_continues_the_same_stream(genome, tmp_path):
    common = ["--fasta", str(genome), "--val-every", "100", "--optim.decay_steps", "6", *TINY]
    run_cli(pretrain_main, [*common, "--output-dir", str(tmp_path / "full"), "--max-steps", "6"])
    run_cli(pretrain_main, [*common, "--output-dir", str(tmp_path / "part"), "--max-steps", "3"])
    assert torch.load(tmp_path / "part/checkpoints/last.ckpt", weights_only=False)["global_step"] == 3
    at_3 = _weights(tmp_path / "part/checkpoints/last.ckpt")
    run_cli(pretrain_main, [*common, "--output-dir", str(tmp_path / "part"), "--max-steps", "6", "--resume"])
    a, b = _weights(tmp_path / "full/checkpoints/last.ckpt"), _weights(tmp_path / "part/checkpoints/last.ckpt")
    assert torch.load(tmp_path / "part/checkpoints/last.ckpt", weights_only=False)["global_step"] == 6
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    assert any(not torch.equal(a[k], at_3[k]) for k in a)   # not trivially: the three steps did train


def test_ddp_two_cpu_processes(genome, tmp_path):
    env = child_env(PYTHONUNBUFFERED="1")
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "genomics.pretrain", "--fasta", str(genome), "--output-dir", str(out),
           "--max-steps", "3", "--val-every", "3", "--devices", "2", "--strategy", "ddp", *TINY]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["world_size"] == 2
    assert m["train_tokens"] == 2 * 3 * 4 * 64               # both ranks' batches counted (torchmetrics sync)
    assert m["val_tokens"] == 2 * 2 * 4 * 64                 # 2 validation batches on each rank, all bases


def _fails_cleanly(argv, capsys, match):
    code = run(pretrain_main, PretrainConfig, argv, prog="genomics.pretrain")
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert match in err, err
    return err


def test_bad_input_one_line_errors(genome, tmp_path, capsys):
    out = str(tmp_path / "o")
    _fails_cleanly(["--fasta", str(tmp_path / "nope.fa"), "--output-dir", out], capsys, "no such file")
    (tmp_path / "empty.fa").write_text(">only_a_header\n")
    _fails_cleanly(["--fasta", str(tmp_path / "empty.fa"), "--output-dir", out], capsys, "no sequence records")
    short = write_fasta(tmp_path / "short.fa", [("chr1", b"ACGT" * 300), ("chr2", b"ACGT" * 10)])
    _fails_cleanly(["--fasta", str(short), "--output-dir", out, "--seq-len", "1024"], capsys, "fewer than --seq-len")
    _fails_cleanly(["--fasta", str(genome), "--output-dir", out, "--val-contigs", "chrZ"], capsys, "chrZ")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    _fails_cleanly(["--fasta", str(genome), "--output-dir", str(blocker / "sub")], capsys, "--output-dir")
    _fails_cleanly(["--objective", "mlm"], capsys, "--model.bidirectional or --model.rc_equivariant")
    assert not any(Path(out).rglob("*.ckpt")) and not (Path(out) / "metrics.json").exists()


def test_residual_in_fp32_flag_reaches_the_saved_model(genome, tmp_path):
    run_cli(pretrain_main, ["--fasta", str(genome), "--output-dir", str(tmp_path), "--max-steps", "2",
                            "--val-every", "2", "--ckpt-every", "2", "--precision", "bf16-true",
                            "--model.residual_in_fp32", "false", *TINY])
    assert MambaLM.from_pretrained(tmp_path / "model").config.residual_in_fp32 is False
    assert PretrainConfig().model.residual_in_fp32 is True


def test_cli_subprocess_error_has_no_traceback(tmp_path):
    # An --output-dir of its own: the repository's runs/genomics may hold the README's first command's run.
    proc = subprocess.run([sys.executable, "-m", "genomics.pretrain", "--fasta", str(tmp_path / "x.fa"),
                           "--output-dir", str(tmp_path / "out")],
                          cwd=REPO, env=child_env(), capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"python -m genomics.pretrain: error: --fasta {tmp_path / 'x.fa'}: no such file"]


def test_embed_evaluate_probe_on_the_checkpoint(trained, genome, tmp_path):
    from genomics.embed import EmbedConfig
    from genomics.embed import main as embed_main
    from genomics.evaluate import EvaluateConfig
    from genomics.evaluate import main as evaluate_main
    from genomics.probe import ProbeConfig
    from genomics.probe import main as probe_main
    run_cli(embed_main, ["--checkpoint", str(trained), "--fasta", str(genome), "--output", str(tmp_path / "e.npy"),
                         "--window", "1000"], EmbedConfig)
    e = np.load(tmp_path / "e.npy")
    assert e.shape == (4, 16) and np.isfinite(e).all()
    assert (tmp_path / "e.npy.ids.tsv").read_text().splitlines()[1].startswith("chr1\tchr1\t0\t20000")
    bed = tmp_path / "r.bed"
    bed.write_text("chr1\t100\t600\tpeak1\nchr2\t0\t50\tpeak2\n")
    run_cli(embed_main, ["--checkpoint", str(trained), "--fasta", str(genome), "--bed", str(bed),
                         "--output", str(tmp_path / "e.parquet")], EmbedConfig)
    import pandas as pd
    df = pd.read_parquet(tmp_path / "e.parquet")
    assert list(df["name"]) == ["peak1", "peak2"] and len(df["embedding"][0]) == 16

    run_cli(evaluate_main, ["--checkpoint", str(trained), "--context-lengths", "32", "128", "--tokens", "1024",
                            "--output-dir", str(tmp_path)], EvaluateConfig)
    ev = json.loads((tmp_path / "evaluate.json").read_text())
    assert [r["context_length"] for r in ev["results"]] == [32, 128] and ev["contigs"] == ["chr20"]
    assert all(r["bits_per_base"] < 1.9 for r in ev["results"])

    rng = np.random.default_rng(0)
    rows = ["sequence,label"]
    for i in range(24):   # class b has a GC-rich alphabet: separable from embeddings
        alphabet = b"ACGT" if i % 2 else b"GGCCA"
        rows.append(bytes(rng.choice(np.frombuffer(alphabet, dtype=np.uint8), 80)).decode() + f",{'ab'[i % 2]}")
    (tmp_path / "l.csv").write_text("\n".join(rows) + "\n")
    run_cli(probe_main, ["--checkpoint", str(trained), "--csv", str(tmp_path / "l.csv"), "--folds", "3",
                         "--output-dir", str(tmp_path)], ProbeConfig)
    pr = json.loads((tmp_path / "probe_l.json").read_text())
    assert pr["n_samples"] == 24 and pr["accuracy"] >= 0.8 and -1 <= pr["mcc"] <= 1


def test_rc_model_embeddings_are_strand_invariant(tmp_path):
    from genomics.common import embed_sequences
    torch.manual_seed(0)
    cfg = MambaConfig(d_model=16, n_layer=1, vocab_size=tok.VOCAB_SIZE, rc_equivariant=True,
                      complement_map=tok.complement_map())
    model = MambaLM(cfg).eval()
    rng = np.random.default_rng(0)
    seqs = [tok.encode_bytes(bytes(rng.choice(np.frombuffer(b"ACGTN", dtype=np.uint8), n))) for n in (50, 130, 7)]
    fwd = list(embed_sequences(model, seqs, torch.device("cpu"), window=1000))
    rev = list(embed_sequences(model, [tok.reverse_complement(s) for s in seqs], torch.device("cpu"), window=1000))
    for a, b in zip(fwd, rev):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    # Windowed pooling of a long sequence = length-weighted mean of its windows (constant memory).
    long = next(embed_sequences(model, [seqs[1]], torch.device("cpu"), window=40, both_strands=False))
    parts = [next(embed_sequences(model, [seqs[1][i:i + 40]], torch.device("cpu"), window=40, both_strands=False))
             for i in range(0, 130, 40)]
    n_real = [int((tok.unmask(seqs[1][i:i + 40]) != tok.N).sum()) for i in range(0, 130, 40)]
    np.testing.assert_allclose(long, np.average(parts, axis=0, weights=n_real), rtol=1e-4, atol=1e-5)


def test_demo_yaml_spells_out_the_defaults():
    """configs/genomics/demo.yaml claims to be the embedded default run: it must give the PretrainConfig
    defaults, and it must set every option of the recipe (so the docs' table stays true)."""
    import yaml

    from ssm_core.cli import load_yaml_config
    path = REPO / "configs/genomics/demo.yaml"
    assert load_yaml_config(PretrainConfig, str(path)) == PretrainConfig()
    spelled = yaml.safe_load(path.read_text())
    keys = {f"{k}.{kk}" for k, v in spelled.items() if isinstance(v, dict) for kk in v} | set(spelled)
    recipe = {"max_steps", "batch_size", "seq_len", "keep_softmask", "model.d_model", "model.n_layer",
              "model.d_state", "model.expand", "optim.lr", "optim.weight_decay", "optim.warmup_steps",
              "val_batches"}
    assert recipe <= keys, recipe - keys
    # and a change in it shows: the comparison above is not vacuous
    assert load_yaml_config(PretrainConfig, str(path), ["--model.d_state", "4"]) != PretrainConfig()


def test_run_writes_its_config_and_config_of_it_repeats_the_run(genome, tmp_path):
    """config.yaml in the output folder is the complete resolved configuration: --config of it alone gives
    the same config, and the same trained weights."""
    from ssm_core.cli import parse_config
    argv = ["--fasta", str(genome), "--max-steps", "2", "--val-every", "2", "--ckpt-every", "2",
            "--model.mixer_options", "{mamba: {conv_bias: false}}", "--optim.betas", "[0.8, 0.9]", *TINY]
    run_cli(pretrain_main, [*argv, "--output-dir", str(tmp_path / "a")])
    written = tmp_path / "a" / "config.yaml"
    cfg = parse_config(PretrainConfig, ["--config", str(written)])
    assert cfg == parse_config(PretrainConfig, [*argv, "--output-dir", str(tmp_path / "a")])
    assert cfg.model.mixer_options == {"mamba": {"conv_bias": False}} and cfg.optim.betas == (0.8, 0.9)
    run_cli(pretrain_main, ["--config", str(written), "--output-dir", str(tmp_path / "b")])
    a, b = _weights(tmp_path / "a/checkpoints/last.ckpt"), _weights(tmp_path / "b/checkpoints/last.ckpt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "model.backbone.layers.0.mixer.conv1d.bias" not in a   # the mixer option reached the model


def test_old_flat_flags_name_their_new_spelling(capsys):
    for old, new in (("--d-model", "--model.d_model"), ("--lr", "--optim.lr"), ("--mixer", "--model.mixer"),
                     ("--lr-decay-steps", "--optim.decay_steps"), ("--rc-equivariant", "--model.rc_equivariant")):
        _fails_cleanly([old, "3"], capsys, f"{old}: moved to {new}")
    _fails_cleanly(["--model.vocab_size", "5"], capsys, "follows from --keep-softmask")
    _fails_cleanly(["--model.d_state", "x"], capsys, "--model.d_state: invalid value 'x'")
    _fails_cleanly(["--model.mixer", "nope"], capsys, "--model.mixer: unknown mixer 'nope'")


def test_tokens_per_second_counts_training_time_across_validations(monkeypatch):
    from genomics import lightning_module as lm
    clock = iter(range(0, 1000, 1))              # each hook call that reads the clock advances it by 1 s
    monkeypatch.setattr(lm.time, "perf_counter", lambda: float(next(clock)))
    m = lm.DNALightningModule(MambaConfig(d_model=8, n_layer=1, vocab_size=tok.VOCAB_SIZE).to_dict())

    def train_batch(i, tokens=100):
        m.on_train_batch_start(None, i)
        m._timed_tokens += tokens                 # what training_step adds

    for i in range(4):                            # batches 0, 1 are start-up: not timed
        train_batch(i)
    m.on_validation_start()                       # pause: 1 s since batch 2 started (clock 0 -> 1)
    next(clock), next(clock)                      # validation takes time that must not count
    for i in range(4, 6):
        train_batch(i)
    m.on_train_end()
    # timed: batches 2-5 = 400 tokens over 1 s (before validation) + 1 s (after it)
    assert m._timed_tokens == 400
    assert m.tokens_per_second() == pytest.approx(400 / 2)


def test_softmask_input_defaults_on_for_the_demo_only():
    assert PretrainConfig().keep_softmask is True
    assert PretrainConfig(fasta=["x.fa"]).keep_softmask is False
    assert PretrainConfig(fasta=["x.fa"], keep_softmask=True).keep_softmask is True
    assert PretrainConfig(keep_softmask=False).keep_softmask is False
