"""Kill and resume: a run SIGKILLed at a random step (or in the middle of writing a checkpoint) and continued
with --resume ends with the uninterrupted run's metrics to the last digit, for each package, on the CPU.

Each run is a real `python -m pkg.mod` process on tiny settings. The kill comes from inside the process, at
a chosen point, through a driver that wraps the entry point for the test only: `step K` adds a callback
that SIGKILLs the process when training reaches step K (after a checkpoint exists); `save N` makes the N-th
checkpoint write stop half-way through its temporary file and SIGKILLs the process there; `term K` sends
SIGTERM at step K instead, which must save a checkpoint (mid-epoch) and end with status 143.
"""
from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest

from .helpers import REPO, child_env

DRIVER = textwrap.dedent("""
    import os, runpy, signal, sys
    mode, at, module, *args = sys.argv[1:]
    at = int(at)
    if mode in ("step", "term"):
        from lightning.pytorch.callbacks import Callback
        import ssm_core.training as training

        class Kill(Callback):
            def on_train_batch_start(self, trainer, *rest):
                if trainer.global_step == at and not trainer.received_sigterm:
                    os.kill(os.getpid(), signal.SIGKILL if mode == "step" else signal.SIGTERM)

        make = training.make_trainer
        training.make_trainer = lambda cfg, *a, callbacks=(), **k: make(cfg, *a, callbacks=[*callbacks, Kill()], **k)
    elif mode == "save":
        import torch
        save, count = torch.save, [0]

        def half_save(obj, f, *a, **k):
            save(obj, f, *a, **k)
            count[0] += str(f).endswith(".tmp")
            if count[0] == at:
                os.truncate(f, os.path.getsize(f) // 2)
                os.kill(os.getpid(), signal.SIGKILL)

        torch.save = half_save
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
""")


def _start(module: str, args: list[str], kill: tuple[str, int] = ("none", 0)) -> tuple:
    """(the process, its stdout file, its stderr file). Files, not pipes: of two runs side by side, the one
    not being read would block on a full pipe."""
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, kill[0], str(kill[1]), module, *args], cwd=REPO,
                            env=child_env(OMP_NUM_THREADS="1"), stdout=out, stderr=err, text=True)
    return proc, out, err


def _finish(started: tuple) -> subprocess.CompletedProcess:
    proc, *files = started
    try:
        proc.wait(timeout=600)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    texts = []
    for f in files:
        f.seek(0)
        texts.append(f.read())
        f.close()
    return subprocess.CompletedProcess(proc.args, proc.returncode, *texts)


def _killed_then_resumed(tmp_path: Path, module: str, args: list[str], kill: tuple[str, int],
                         trained_in: str = ".") -> tuple[Path, Path]:
    """(the uninterrupted run's folder, the killed-and-resumed run's folder). `trained_in`: the subfolder of
    the output folder where the killed training writes its checkpoints."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    # The uninterrupted run and the one to be killed are independent: side by side (one thread each).
    running = _start(module, [*args, "--output-dir", str(full)]), _start(module, [*args, "--output-dir", str(cut)], kill)
    done, killed = (_finish(p) for p in running)
    assert done.returncode == 0, done.stderr[-3000:]
    if kill[0] == "term":
        assert killed.returncode == 128 + signal.SIGTERM, (kill, killed.returncode, killed.stderr[-3000:])
        line = killed.stderr.strip().splitlines()[-1]
        assert line.startswith(f"python -m {module}: stopped by SIGTERM; checkpoint saved at step "), line
    else:
        assert killed.returncode == -signal.SIGKILL, (kill, killed.returncode, killed.stderr[-3000:])
    assert (cut / trained_in / "checkpoints" / "last.ckpt").is_file(), kill
    resumed = _finish(_start(module, [*args, "--output-dir", str(cut), "--resume"]))
    assert resumed.returncode == 0, (kill, resumed.stderr[-3000:])
    assert not [p for p in cut.rglob("*.tmp")], "a stale temporary file of the killed write is left"
    return full, cut


def _log_rows(run: Path) -> list[dict]:
    import csv
    with open(run / "logs" / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def _same_logs(full: Path, cut: Path, kill) -> None:
    """The resumed run's CSV log reads as the uninterrupted one: the same rows, the same values."""
    a, b = _log_rows(full), _log_rows(cut)
    assert [r["step"] for r in a] == [r["step"] for r in b], kill
    assert a == b, kill


def test_genomics_resume_is_exact(tmp_path):
    rng = np.random.default_rng(0)
    seq = np.frombuffer(b"ACGT", np.uint8)[rng.integers(0, 4, 12000)].tobytes()
    fasta = tmp_path / "g.fa"
    fasta.write_bytes(b">chr1\n" + seq[:9000] + b"\n>chr20\n" + seq[9000:] + b"\n")
    args = ["--fasta", str(fasta), "--val-contigs", "chr20", "--max-steps", "8",
            "--val-every", "4", "--ckpt-every", "2", "--seq-len", "64", "--batch-size", "4", "--model.d_model", "16",
            "--model.n_layer", "1", "--val-batches", "2", "--accelerator", "cpu", "--cache-dir", str(tmp_path / "c")]
    kill = ("step", random.randrange(3, 8))
    full, cut = _killed_then_resumed(tmp_path, "genomics.pretrain", args, kill)
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (full, cut))
    keys = ("val_loss", "val_accuracy", "val_tokens", "train_tokens", "global_step")
    assert {k: a[k] for k in keys} == {k: b[k] for k in keys}, kill
    assert a["train_tokens"] == 8 * 4 * 64, "train_tokens counts the whole run across the resume"
    _same_logs(full, cut, kill)


@pytest.mark.parametrize("kill", [("term", None), ("save", 3)], ids=["sigterm-mid-epoch", "kill-mid-checkpoint"])
def test_timeseries_resume_is_exact(tmp_path, kill):
    from timeseries.data import synthetic_frame
    csv = tmp_path / "s.csv"
    synthetic_frame(n_rows=300, n_series=2, seed=1).to_csv(csv, index=False)
    # 146 training windows at batch 32: 5 steps an epoch, a checkpoint after each epoch's validation.
    # Every setting fixed, so the default recipe's search has one trial to train (in search/trial0).
    args = ["--csv", str(csv), "--lookback", "24", "--horizon", "8", "--model.d_model", "8", "--model.n_layer", "1",
            "--model.d_state", "4", "--optim.lr", "0.001", "--forecaster.loss", "mse", "--max-epochs", "3",
            "--batch-size", "32", "--no-progress", "--no-baselines"]
    if kill[0] == "term":
        kill = ("term", random.choice([6, 7, 8, 11, 12, 13]))   # not an epoch's first step: mid-epoch
    trial = "search/trial0"
    full, cut = _killed_then_resumed(tmp_path, "timeseries.fit", args, kill, trained_in=trial)
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (full, cut))
    keys = ("test_mse", "test_mae", "test_mse_original", "test_mae_original")
    assert {k: a[k] for k in keys} == {k: b[k] for k in keys}, kill
    assert (full / "forecast.csv").read_text() == (cut / "forecast.csv").read_text(), kill
    _same_logs(full / trial, cut / trial, kill)


@pytest.fixture(scope="module")
def synth_cache(tmp_path_factory):
    from audio import synth
    cache = tmp_path_factory.mktemp("synth")
    synth.ensure_dataset(synth.synth_config("tiny", seed=0), cache, progress=False)
    return cache


def test_audio_resume_is_exact(tmp_path, synth_cache):
    # With the weights' moving average too (--ema-decay): the checkpoint holds the average and the raw weights,
    # and training continues from the raw ones.
    args = ["--synth-size", "tiny", "--synth-cache", str(synth_cache), "--max-steps", "9", "--val-every", "3",
            "--batch-size", "8", "--model.d_model", "16", "--model.n_layer", "1", "--accelerator", "cpu",
            "--ema-decay", "0.9"]
    kill = ("step", random.randrange(4, 9))
    full, cut = _killed_then_resumed(tmp_path, "audio.train", args, kill)
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (full, cut))
    assert a["steps"] == b["steps"] == 9
    assert a["validation"] == b["validation"] and a["testing"] == b["testing"], kill
    _same_logs(full, cut, kill)


def test_genomics_checkpoints_from_before_train_tokens_was_saved_still_load():
    import torch

    from genomics.lightning_module import DNALightningModule
    from genomics.tokenizer import VOCAB_SIZE
    from ssm_core import MambaConfig
    module = DNALightningModule(MambaConfig(d_model=8, n_layer=1, d_state=4, vocab_size=VOCAB_SIZE).to_dict())
    module.train_tokens.update(torch.tensor(640.0))
    saved = {"state_dict": module.state_dict()}
    assert float(saved["state_dict"]["train_tokens.sum_value"]) == 640.0   # the count is in a checkpoint now
    old = {"state_dict": {k: v for k, v in saved["state_dict"].items() if not k.startswith("train_tokens.")}}
    fresh = DNALightningModule(MambaConfig(d_model=8, n_layer=1, d_state=4, vocab_size=VOCAB_SIZE).to_dict())
    fresh.on_load_checkpoint(old)                  # what Lightning calls before loading the state dict
    fresh.load_state_dict(old["state_dict"])       # strict, as Lightning loads it
    assert float(fresh.train_tokens.compute()) == 0.0
