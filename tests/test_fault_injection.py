"""Fault injection: bad inputs and interruptions through the real command lines.

Each case runs a CLI's `__main__` (`python -m pkg.mod ARGS`) on tiny inputs and asserts what a user must
see: exit status 2, exactly one line `python -m pkg.mod: error: ...` on stderr naming the flag or file, no
traceback, and the user's files unchanged (bytes and mtime). To keep the suite fast, the cases share one
interpreter (one import of torch instead of one per case): a driver process runs each module with
`runpy.run_module(..., run_name="__main__")` under its own argv and stderr, as `python -m` does. The signal
test sends a real SIGTERM to a separate training process.
"""
from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from ssm_core.run_dir import MARKER

from .helpers import REPO, child_env

DRIVER = textwrap.dedent("""
    import contextlib, io, json, runpy, sys, traceback, warnings
    warnings.filterwarnings("ignore", category=RuntimeWarning, module="runpy")  # a module run twice
    cases_file, results_file = sys.argv[1:3]
    results = []
    for module, args in json.load(open(cases_file)):
        sys.argv = [module, *args]
        err, out = io.StringIO(), io.StringIO()
        code = 0
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            try:
                runpy.run_module(module, run_name="__main__", alter_sys=True)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except BaseException:
                traceback.print_exc()
                code = "uncaught"
        results.append({"code": code, "stderr": err.getvalue(), "stdout": out.getvalue()})
    json.dump(results, open(results_file, "w"))
""")


def _env():
    return child_env(OMP_NUM_THREADS="1")


# --- tiny inputs ------------------------------------------------------------------------------------------
def _timeseries_model(root: Path) -> tuple[Path, Path]:
    from ssm_core import MambaConfig
    from timeseries.data import prepare, synthetic_frame, table_from_frame
    from timeseries.models import ForecasterConfig, build_model
    from timeseries.persistence import save_forecaster
    df = synthetic_frame(n_rows=200, n_series=2, seed=1)
    csv = root / "history.csv"
    df.to_csv(csv, index=False)
    prep = prepare(table_from_frame(df), 24, 8)
    model = build_model(ForecasterConfig(n_series=2, lookback=24, horizon=8,
                                         backbone=MambaConfig(d_model=8, n_layer=1, d_state=4, d_input=24)))
    save_forecaster(root / "forecaster" / "model", model, prep)
    df.loc[150, "series_1"] = np.inf
    df.to_csv(root / "with_inf.csv", index=False)
    return root / "forecaster", csv


def _audio_inputs(root: Path) -> Path:
    import soundfile as sf

    from audio.features import save_audio
    from audio.model import KeywordSpotter, KWSConfig, export_model
    from ssm_core import MambaConfig
    encoder = MambaConfig(d_model=8, n_layer=1, d_state=4, d_input=80)
    export_model(KeywordSpotter(KWSConfig(labels=["yes", "no", "_silence_", "_unknown_"], encoder=encoder)),
                 root / "kws")
    t = np.arange(16000) / 16000
    save_audio(root / "tone.wav", 0.3 * np.sin(2 * np.pi * 440 * t), 16000)
    wave = (0.1 * np.sin(2 * np.pi * 300 * t)).astype(np.float32)
    wave[8000:8100] = np.nan
    sf.write(root / "nan.wav", wave, 16000, subtype="FLOAT")
    return root / "kws"


def _genomics_inputs(root: Path) -> Path:
    from Bio import bgzf

    from genomics import tokenizer as tok
    from ssm_core import MambaConfig, MambaLM
    MambaLM(MambaConfig(d_model=8, n_layer=1, d_state=4, vocab_size=tok.VOCAB_SIZE)).save_pretrained(root / "dna")
    seq = np.random.default_rng(0).choice(np.frombuffer(b"ACGT", np.uint8), 6000).tobytes()
    fasta = b">chr1\n" + b"".join(seq[i:i + 60] + b"\n" for i in range(0, len(seq), 60))
    corrupt = bytearray(gzip.compress(fasta))
    for i in range(200, 400):
        corrupt[i] ^= 0x5A
    (root / "corrupt.fa.gz").write_bytes(bytes(corrupt))
    with bgzf.BgzfWriter(str(root / "good.fa.bgz")) as w:
        w.write(fasta)
    corrupt = bytearray((root / "good.fa.bgz").read_bytes())
    for i in range(300, 500):
        corrupt[i] ^= 0x5A
    (root / "corrupt.fa.bgz").write_bytes(bytes(corrupt))
    (root / "good.fa.bgz").unlink()
    (root / "dups").mkdir()
    (root / "dups" / "dup.fa").write_text(">a\nACGTACGT\n>a\nACGTTTTT\n")
    (root / "dups" / "dup.fa.fai").write_text("a\t8\t3\t8\t9\n")   # the user's, older than the FASTA
    os.utime(root / "dups" / "dup.fa.fai", (0, 0))
    return root / "dna"


def _snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file() and "cache" not in p.parts}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    ts_model, csv = _timeseries_model(root)
    kws = _audio_inputs(root)
    dna = _genomics_inputs(root)
    (root / "blocker").write_text("a file where a folder is expected")
    (root / "mine").mkdir()
    (root / "mine" / "notes.txt").write_text("a user's folder, not a run's")
    (root / "earlier").mkdir()   # the folder of an earlier run, as prepare_run_dir marks it
    (root / "earlier" / MARKER).write_text(json.dumps({"tool": "long-ssm", "program": "timeseries.fit",
                                                       "owned": ["metrics.json"]}))
    (root / "earlier" / "metrics.json").write_text("{}")
    return {"root": root, "ts": ts_model, "csv": csv, "kws": kws, "dna": dna}


def _cases(w):
    r, ts, csv, kws, dna = w["root"], str(w["ts"]), str(w["csv"]), str(w["kws"]), str(w["dna"])
    cache = ["--cache-dir", str(r / "cache")]
    return {
        # id: (module, args, text the one line must contain)
        "predict-output-is-input": ("timeseries.predict", ["--model", ts, "--csv", csv, "--output", csv],
                                    f"--output {csv}: is the input --csv"),
        "predict-output-is-a-users-file": ("timeseries.predict", ["--model", ts, "--csv", csv, "--output",
                                                                  str(r / "with_inf.csv")],
                                           "exists and is not an earlier forecast"),
        "predict-output-is-model-file": ("timeseries.predict", ["--model", ts, "--csv", csv, "--output",
                                                                str(w["ts"] / "model" / "forecaster.json")],
                                         "exists and is not an earlier forecast"),
        "csv-with-inf": ("timeseries.predict", ["--model", ts, "--csv", str(r / "with_inf.csv"), "--output",
                                                str(r / "out" / "f.csv")],
                         "column 'series_1', row 152 is inf"),
        "stream-nan-wav": ("audio.stream", ["--model", kws, "--wav", str(r / "nan.wav")],
                           "sample 8000 (0.500 s) is nan"),
        "stream-negative-seconds": ("audio.stream", ["--model", kws, "--wav", str(r / "tone.wav"), "--seconds", "-1"],
                                    "--seconds: must be > 0"),
        "stream-missing-wav": ("audio.stream", ["--model", kws, "--wav", str(r / "absent.wav")],
                               f"--wav {r / 'absent.wav'}: no such file"),
        "stream-dump-over-input": ("audio.stream", ["--model", kws, "--wav", str(r / "tone.wav"),
                                                    "--dump-posteriors", str(r / "tone.wav")],
                                   "--dump-posteriors"),
        "synth-snr-nan": ("audio.synth", ["--output-wav", str(r / "out" / "demo.wav"), "--snr-db", "nan"],
                          "--snr-db: must be a finite number, got nan"),
        "synth-output-under-a-file": ("audio.synth", ["--output-wav", str(r / "blocker" / "demo.wav")],
                                      "--output-wav"),
        "embed-corrupt-gzip": ("genomics.embed", ["--checkpoint", dna, "--fasta", str(r / "corrupt.fa.gz"),
                                                  "--output", str(r / "out" / "e.npy"), *cache],
                               "corrupt.fa.gz: cannot read as gzip"),
        "embed-corrupt-bgzf": ("genomics.embed", ["--checkpoint", dna, "--fasta", str(r / "corrupt.fa.bgz"),
                                                  "--output", str(r / "out" / "e.npy"), *cache],
                               "corrupt.fa.bgz: not a valid FASTA file"),
        # The run layer: every option checked before any work (no process, no data, no folder).
        **{f"pretrain-{name}": ("genomics.pretrain", [*args, "--output-dir", str(r / "out" / "g")], expected)
           for name, args, expected in RUN_OPTION_CASES},
        "fit-devices-99": ("timeseries.fit", ["--devices", "99", "--accelerator", "cpu", "--output-dir",
                                              str(r / "out" / "t")], "--devices 99: this machine has"),
        "audio-train-val-every-0": ("audio.train", ["--val-every", "0", "--synth-cache", str(r / "no-synth"),
                                                    "--output-dir", str(r / "out" / "a")],
                                    "--val-every: must be >= 1, got 0"),
        "audio-train-n-mels-0": ("audio.train", ["--features.n_mels", "0", "--synth-cache", str(r / "no-synth"),
                                                 "--output-dir", str(r / "out" / "a")],
                                 "--features.n_mels: must be >= 1, got 0"),
        "audio-evaluate-batch-size-0": ("audio.evaluate", ["--model", kws, "--batch-size", "0"],
                                        "--batch-size: must be >= 1, got 0"),
        # The output folder: a user's is refused, an earlier run needs --resume or --overwrite.
        "pretrain-into-a-users-folder": ("genomics.pretrain", ["--output-dir", str(r / "mine"), *cache],
                                         "is not empty (notes.txt) and is not a folder of an earlier run"),
        "fit-into-an-earlier-run": ("timeseries.fit", ["--csv", csv, "--output-dir", str(r / "earlier")],
                                    "holds an earlier run; pass --resume to continue it or --overwrite"),
        "fit-resume-and-overwrite": ("timeseries.fit", ["--csv", csv, "--output-dir", str(r / "earlier"),
                                                        "--resume", "--overwrite"], "--resume and --overwrite"),
        "fit-resume-without-a-checkpoint": ("timeseries.fit", ["--csv", csv, "--output-dir", str(r / "earlier"),
                                                               "--resume"], "--resume: no checkpoint"),
        "embed-duplicate-names-keeps-users-fai": ("genomics.embed", ["--checkpoint", dna, "--fasta",
                                                                     str(r / "dups" / "dup.fa"), "--output",
                                                                     str(r / "out" / "e.npy"), *cache],
                                                  'Duplicate key "a"'),
    }


# (name, flags, what the line says) of genomics.pretrain runs refused before any work.
RUN_OPTION_CASES = [
    ("devices-99", ["--devices", "99", "--accelerator", "cpu"], "--devices 99: this machine has"),
    ("lr-nan", ["--optim.lr", "nan"], "--optim.lr: must be a finite number, got nan"),
    ("lr-inf", ["--optim.lr", "inf"], "--optim.lr: must be a finite number, got inf"),
    ("lr-negative", ["--optim.lr", "-1"], "--optim.lr: must be > 0"),
    ("precision-7", ["--precision", "7"], "--precision: expected one of"),
    ("fsdp-on-cpu", ["--strategy", "fsdp", "--accelerator", "cpu"], "--strategy fsdp: needs CUDA GPUs"),
    ("num-workers-negative", ["--num-workers", "-1"], "--num-workers: must be >= 0, got -1"),
]


def _reruns(w):
    """Runs that must succeed: predict into a new file, then again over its own earlier forecast."""
    args = ["--model", str(w["ts"]), "--csv", str(w["csv"]), "--output", str(w["root"] / "out" / "forecast.csv")]
    return [("timeseries.predict", args), ("timeseries.predict", args)]


@pytest.fixture(scope="module")
def replayed(world, tmp_path_factory):
    """Every case run once through the driver, with the files as they were before and after."""
    cases = _cases(world)
    d = tmp_path_factory.mktemp("driver")
    (d / "cases.json").write_text(json.dumps([[m, a] for m, a, _ in cases.values()] + _reruns(world)))
    before = _snapshot(world["root"])
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(d / "cases.json"), str(d / "results.json")],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((d / "results.json").read_text())
    return dict(zip(cases, results)), results[len(cases):], cases, before, _snapshot(world["root"])


CASE_IDS = list(_cases({"root": Path("/r"), "ts": Path("/t"), "csv": "c", "kws": "k", "dna": "d"}))


@pytest.mark.parametrize("case", CASE_IDS)
def test_bad_input_is_one_line_exit_2_nothing_destroyed(replayed, case):
    results, _, cases, _, _ = replayed
    module, _, expected = cases[case]
    got = results[case]
    lines = got["stderr"].strip().splitlines()
    assert got["code"] == 2, got
    assert len(lines) == 1, got["stderr"]
    assert lines[0].startswith(f"python -m {module}: error: ") and expected in lines[0], lines[0]
    assert "Traceback" not in got["stderr"]


def test_no_user_file_was_changed_or_removed(replayed):
    *_, before, after = replayed
    changed = [k for k in before if after.get(k) != before[k]]
    assert not changed, changed
    assert set(after) - set(before) == {"out/forecast.csv"}, set(after) - set(before)


def test_predict_may_replace_its_own_earlier_forecast(replayed, world):
    _, reruns, *_ = replayed
    assert [r["code"] for r in reruns] == [0, 0], reruns
    assert len((world["root"] / "out" / "forecast.csv").read_text().splitlines()) == 1 + 8


# --- SIGTERM from outside ---------------------------------------------------------------------------------
TRAIN = textwrap.dedent("""
    import sys, time
    import lightning as L, torch
    from ssm_core.callbacks import SignalCheckpoint
    from ssm_core.errors import guard

    class Slow(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(4, 1)
        def training_step(self, batch, i):
            if self.global_step == 2:
                print("training", flush=True)
            time.sleep(0.05)
            return self.layer(batch[0]).pow(2).mean()
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    def main():
        data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(4000, 4)), batch_size=4)
        L.Trainer(max_steps=1000, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False,
                  callbacks=[SignalCheckpoint(sys.argv[1])]).fit(Slow(), data)

    sys.exit(guard(main, "train")())
""")


def test_sigterm_saves_a_checkpoint_and_exits_143(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", TRAIN, str(tmp_path / "checkpoints")], cwd=REPO, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "training"
        time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    last = [ln for ln in err.splitlines() if ln.startswith("train:")]
    assert len(last) == 1 and last[0].startswith("train: stopped by SIGTERM; checkpoint saved at step "), err
    assert "continue with --resume" in last[0] and "Traceback" not in err
    import torch
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] >= 2


# --- non-finite and empty results are errors ----------------------------------------------------------------
def test_all_n_validation_is_an_error_not_zero_bits(tmp_path):
    """A held-out contig of only N used to report `val bits/base 0.0000` with exit 0."""
    seq = np.random.default_rng(0).choice(np.frombuffer(b"ACGT", np.uint8), 6000).tobytes().decode()
    (tmp_path / "n.fa").write_text(f">chr1\n{seq}\n>chr20\n{'N' * 2000}\n")
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "genomics.pretrain", "--fasta", str(tmp_path / "n.fa"),
                           "--val-contigs", "chr20", "--max-steps", "2", "--val-every", "2", "--seq-len", "64",
                           "--batch-size", "4", "--model.d_model", "8", "--model.n_layer", "1", "--val-batches", "1",
                           "--accelerator", "cpu", "--cache-dir", str(tmp_path / "cache"), "--output-dir", str(out)],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300, check=False)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert last.startswith("python -m genomics.pretrain: error: validation saw nothing (val_tokens = 0)"), last
    assert "Traceback" not in proc.stderr
    assert not (out / "model").exists() and not (out / "metrics.json").exists()
