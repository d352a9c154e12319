"""genomics.finetune on tiny inputs: CSV and folder-per-class data, regression, the k-mer baseline, and
clean one-line failures on bad input."""
from __future__ import annotations

import json

import numpy as np
import pytest

from genomics import tokenizer as tok
from genomics.finetune import FinetuneConfig, FinetuneModule, kmer_features, metrics, stratified_split
from genomics.finetune import main as finetune_main
from ssm_core import MambaConfig
from ssm_core.cli import UserError, parse_config, run

from ..helpers import REPO
from .test_score_stream import save_tiny

FAST = ["--max-epochs", "2", "--batch-size", "16", "--accelerator", "cpu", "--kmer-sizes", "2", "3"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    save_tiny(folder, softmask=True)
    return folder


def labelled(n, rng, motif="GATTACAGATTACA"):
    """Half the sequences carry a motif: a task a k-mer model and the fine-tuned model can both learn."""
    seqs, labels = [], []
    for i in range(n):
        s = "".join(rng.choice(list("ACGT"), 60))
        if i % 2:
            at = int(rng.integers(0, 60 - len(motif)))
            s = s[:at] + motif + s[at + len(motif):]
        seqs.append(s)
        labels.append("motif" if i % 2 else "plain")
    return seqs, labels


def test_finetune_csv_writes_metrics_baseline_and_png(checkpoint, tmp_path):
    rng = np.random.default_rng(0)
    seqs, labels = labelled(80, rng)
    csv = tmp_path / "train.csv"
    csv.write_text("sequence,label\n" + "".join(f"{s},{y}\n" for s, y in zip(seqs, labels)))
    out = tmp_path / "run"
    assert run(finetune_main, FinetuneConfig, ["--checkpoint", str(checkpoint), "--csv", str(csv),
                                               "--output-dir", str(out), *FAST], prog="t") == 0
    res = json.loads((out / "finetune.json").read_text())
    assert res["task"] == "classification" and res["classes"] == ["motif", "plain"]
    assert res["n"] == {"train": 54, "valid": 10, "test": 16}          # 20% test, then 15% validation
    for side in (res["finetuned"], res["baseline"]["test"]):
        assert {"accuracy", "mcc", "auroc", "confusion_matrix"} <= set(side)
        assert sum(map(sum, side["confusion_matrix"])) == 16
    assert res["baseline"]["k"] in (2, 3) and res["baseline"]["test"]["accuracy"] > 0.7   # the motif shows in 3-mers
    assert (out / "finetune.png").is_file() and (out / "checkpoints" / "best.ckpt").is_file()
    assert len((out / "predictions.tsv").read_text().splitlines()) == 17


def test_finetune_class_folders_with_train_test_and_regression(checkpoint, tmp_path):
    rng = np.random.default_rng(1)
    root = tmp_path / "bench"
    for split, n in (("train", 30), ("test", 8)):
        for c in ("neg", "pos"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                (root / split / c / f"{i}.txt").write_text("".join(rng.choice(list("ACGT"), 40)) + "\n")
    out = tmp_path / "cls"
    assert run(finetune_main, FinetuneConfig, ["--checkpoint", str(checkpoint), "--folder", str(root),
                                               "--output-dir", str(out), *FAST], prog="t") == 0
    res = json.loads((out / "finetune.json").read_text())
    assert res["n"]["test"] == 16 and res["n"]["train"] + res["n"]["valid"] == 60

    seqs = ["".join(rng.choice(list("ACGT"), 50)) for _ in range(60)]
    csv = tmp_path / "gc.csv"     # regression: GC content
    csv.write_text("sequence,label\n" + "".join(f"{s},{(s.count('G') + s.count('C')) / 50:.3f}\n" for s in seqs))
    out = tmp_path / "reg"
    assert run(finetune_main, FinetuneConfig, ["--checkpoint", str(checkpoint), "--csv", str(csv),
                                               "--output-dir", str(out), *FAST], prog="t") == 0
    res = json.loads((out / "finetune.json").read_text())
    assert res["task"] == "regression" and {"r2", "pearson", "mse"} <= set(res["finetuned"])
    assert res["baseline"]["test"]["r2"] > 0.8                   # 2-mer frequencies give GC content


def test_kmer_features_and_metrics():
    f = kmer_features([tok.encode_bytes("ACGTN" + "AC")], 2)
    # 2-mers AC, CG, GT, AC (windows with N left out): AC twice of four
    assert f.shape == (1, 16) and f[0, 0 * 4 + 1] == pytest.approx(0.5) and f.sum() == pytest.approx(1.0)
    m = metrics(np.array([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0]]), np.array([0, 1, 1]), 2)
    assert m["accuracy"] == pytest.approx(2 / 3) and m["confusion_matrix"] == [[1, 0], [1, 1]]
    keep, held = stratified_split(np.array([0] * 10 + [1] * 10), 0.2, 0, True)
    assert len(held) == 4 and len(set(keep) | set(held)) == 20


@pytest.mark.parametrize("make,match", [
    (lambda p: p.write_text("seq,lab\nACGT,1\n"), "needs columns 'sequence' and 'label'"),
    (lambda p: p.write_text("sequence,label\n" + "ACGT,a\n" * 20), "one class only"),
    (lambda p: p.write_bytes(b"\xff\xfe\x00bad"), "not a readable CSV"),
])
def test_finetune_bad_csv_fails_in_one_line(checkpoint, tmp_path, capsys, make, match):
    csv = tmp_path / "x.csv"
    make(csv)
    rc = run(finetune_main, FinetuneConfig, ["--checkpoint", str(checkpoint), "--csv", str(csv),
                                             "--output-dir", str(tmp_path / "o"), *FAST], prog="t")
    err = capsys.readouterr().err.strip()
    assert rc == 2 and match in err and len(err.splitlines()) == 1


def test_finetune_empty_class_folder_fails_cleanly(checkpoint, tmp_path, capsys):
    (tmp_path / "d" / "a").mkdir(parents=True)
    (tmp_path / "d" / "b").mkdir()
    (tmp_path / "d" / "a" / "1.txt").write_text("ACGT\n")
    rc = run(finetune_main, FinetuneConfig, ["--checkpoint", str(checkpoint), "--folder", str(tmp_path / "d"),
                                             "--output-dir", str(tmp_path / "o"), *FAST], prog="t")
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "empty class folder" in err and len(err.splitlines()) == 1


def test_rc_equivariant_sequence_model_is_strand_invariant():
    import torch

    from genomics.finetune import SequenceModel
    from genomics.lightning_module import model_inputs
    torch.manual_seed(0)
    m = SequenceModel(MambaConfig(d_model=16, n_layer=1, d_state=4, expand=1, rc_equivariant=True,
                                      **model_inputs(False, True)), 3).eval()
    ids = torch.from_numpy(tok.encode_bytes("ACGGTTACGATTTACG")[None].astype(np.int64))
    rc = torch.from_numpy(tok.reverse_complement(ids.numpy()).astype(np.int64))
    mask = torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(m(ids, mask), m(rc, mask), rtol=1e-5, atol=1e-5)


def test_finetune_optimiser_decays_weights_only_and_trains_the_backbone_at_its_own_lr():
    import dataclasses

    from genomics.lightning_module import model_inputs
    cfg = parse_config(FinetuneConfig, ["--task", "motif"])
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.backbone_lr) == (3e-3, 0.01, 1e-3)
    config = MambaConfig(d_model=16, n_layer=2, d_state=4, expand=1, **model_inputs(False, False)).to_dict()
    module = FinetuneModule(config, 2, False, dataclasses.asdict(cfg.optim), cfg.backbone_lr, False, total_steps=20)
    opt_sched = module.configure_optimizers()
    opt, sched = opt_sched["optimizer"], opt_sched["lr_scheduler"]["scheduler"]
    where = {id(p): (g["lr"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}
    got = {n: where[id(p)] for n, p in module.model.named_parameters()}
    assert set(got) == {n for n, _ in module.model.named_parameters()}        # every parameter trains
    no_decay = [n for n in got if n.endswith(("A_log", ".D", "bias")) or "norm" in n or n.startswith("head.0.")]
    assert any(n.endswith("A_log") for n in no_decay) and any("norm" in n for n in no_decay)
    for n, (lr, wd) in got.items():
        assert lr == pytest.approx(1e-3 if n.startswith("backbone.") else 3e-3), n
        assert wd == (0.0 if n in no_decay else 0.01), n     # A_log, norms (batch norm too), biases: never
    assert got["head.1.weight"] == (pytest.approx(3e-3), 0.01)
    assert any(wd == 0.01 for n, (_, wd) in got.items() if n.endswith("in_proj.weight"))
    for _ in range(20):         # the default schedule keeps the learning rates constant, as before the recipe
        opt.step()
        sched.step()
    assert sorted({round(g["lr"], 12) for g in opt.param_groups}) == [1e-3, 3e-3]

    frozen = FinetuneModule(config, 2, False, dataclasses.asdict(cfg.optim), cfg.backbone_lr, True, total_steps=20)
    params = [p for g in frozen.configure_optimizers()["optimizer"].param_groups for p in g["params"]]
    assert {id(p) for p in params} == {id(p) for p in frozen.model.head.parameters()}


@pytest.mark.parametrize("flag,match", [("--lr", "--lr: moved to --optim.lr"),
                                        ("--weight-decay", "--weight-decay: moved to --optim.weight_decay"),
                                        ("--backbone-lr", "--backbone-lr: must be > 0")])
def test_finetune_old_optimiser_flags_name_their_new_spelling(flag, match):
    with pytest.raises(UserError, match=match):
        parse_config(FinetuneConfig, ["--task", "motif", flag, "0"])


@pytest.mark.parametrize("n_out", [2, 3, 1])
def test_probe_init_head_computes_the_fitted_regression_in_eval_mode(n_out):
    """The head starts as the standardised logistic (ridge) regression fitted on the frozen pooled features:
    in eval mode its logits are sklearn's decision function of the same features, for binary, multiclass
    and regression targets."""
    import torch

    from genomics.finetune import SequenceModel, collate, probe_init_head
    torch.manual_seed(0)
    model = SequenceModel(MambaConfig(d_model=8, n_layer=1, vocab_size=16), n_out)
    rng = np.random.default_rng(0)
    seqs = [rng.integers(tok.A, tok.T + 1, int(rng.integers(20, 40))) for _ in range(60)]
    y = (rng.normal(size=60).astype(np.float32) if n_out == 1 else np.arange(60) % n_out)
    batches = [collate(list(zip(seqs[i:i + 16], y[i:i + 16]))) for i in range(0, 60, 16)]
    fit = probe_init_head(model, batches[:3], y[:48], batches[3:], y[48:], n_out == 1, seed=0)
    assert fit["regularisation"] == ("alpha" if n_out == 1 else "C")
    model.eval()
    with torch.no_grad():
        out = torch.cat([model(ids, mask) for ids, mask, _ in batches]).double().numpy()
        X = torch.cat([model.pooled(ids, mask) for ids, mask, _ in batches[:3]]).double().numpy()
    assert model.training is False and np.isfinite(out).all()
    # refit the chosen model on the same standardised features and compare decision functions
    from sklearn.linear_model import LogisticRegression, Ridge
    Xall = torch.cat([model.pooled(ids, mask) for ids, mask, _ in batches]).detach().double().numpy()
    scale = np.sqrt(X.var(0) + model.head[0].eps)
    Xs, Xall_s = (X - X.mean(0)) / scale, (Xall - X.mean(0)) / scale
    if n_out == 1:
        ref = Ridge(alpha=fit["value"]).fit(Xs, y[:48]).predict(Xall_s)
        np.testing.assert_allclose(out[:, 0], ref, rtol=1e-4, atol=1e-4)
    else:
        ref = LogisticRegression(C=fit["value"], max_iter=2000, random_state=0).fit(Xs, y[:48]).decision_function(Xall_s)
        if n_out == 2:
            np.testing.assert_allclose(out[:, 1] - out[:, 0], ref, rtol=1e-4, atol=1e-4)
        else:
            np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


def test_finetune_grid_benchmark_means_over_seeds_and_continues_a_cut_grid(checkpoint, tmp_path, monkeypatch):
    """benchmarks/genomics_finetune_grid.py at tiny size: one run per task x seed x recipe through the CLI's
    code, the summary is the mean over seeds beside the baseline, and finished runs are read, not repeated."""
    import importlib.util
    import sys
    path = REPO / "benchmarks" / "genomics_finetune_grid.py"
    spec = importlib.util.spec_from_file_location("genomics_finetune_grid", path)
    grid = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, grid)     # dataclasses look their module up there
    spec.loader.exec_module(grid)
    monkeypatch.setenv("GENOMICS_CACHE", str(tmp_path / "cache"))
    argv = ["--checkpoint", str(checkpoint), "--tasks", "motif", "--seeds", "0", "1", "--recipes",
            "lp-ft=--probe-init", "ft=", "--extra=--samples-per-class 12 --max-epochs 1 --batch-size 8 --accelerator cpu "
            "--kmer-sizes 2", "--workdir", str(tmp_path / "grid"), "--out", str(tmp_path / "grid.json")]
    res = grid.main(parse_config(grid.GridConfig, argv))
    assert [(r["seed"], r["recipe"]) for r in res["runs"]] == [(0, "lp-ft"), (0, "ft"), (1, "lp-ft"), (1, "ft")]
    summary = {r["recipe"]: r for r in res["summary"]}
    lp = [r for r in res["runs"] if r["recipe"] == "lp-ft"]
    assert summary["lp-ft"]["finetuned_accuracy"]["mean"] == pytest.approx(np.mean([r["finetuned_accuracy"] for r in lp]))
    assert summary["lp-ft"]["seeds"] == [0, 1] and "baseline_accuracy" in summary["ft"]
    first = json.loads((tmp_path / "grid" / "ft" / "motif" / "seed1" / "finetune.json").read_text())
    assert first["probe_init"] is None and json.loads(
        (tmp_path / "grid" / "lp-ft" / "motif" / "seed1" / "finetune.json").read_text())["probe_init"]["regularisation"] == "C"
    again = grid.main(parse_config(grid.GridConfig, argv))      # every run is read back
    assert [r["finetuned_accuracy"] for r in again["runs"]] == [r["finetuned_accuracy"] for r in res["runs"]]
    assert json.loads((tmp_path / "grid.json").read_text())["summary"] == again["summary"]
