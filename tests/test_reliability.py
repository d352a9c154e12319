"""The reliability library: option checks, the output-folder policy, the last-resort error line, and the
callbacks that stop on NaN and checkpoint on SIGTERM/SIGINT."""
from __future__ import annotations

import errno
import json
import os
import signal
import sys
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
import torch

from ssm_core.cli import UserError
from ssm_core.errors import exit_code, guard, one_line, report, strip_debug_flag
from ssm_core.run_dir import MARKER, prepare_run_dir, remove_stale_tmp
from ssm_core.validation import (
    at_least,
    cache_folder,
    check_devices,
    check_precision,
    check_strategy,
    cpu_count,
    distinct_paths,
    in_range,
    output_file,
    positive_finite,
    validate_run,
    writable_folder,
)


# --- single values ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0, 0.0, "abc"])
def test_positive_finite_refuses_and_names_the_flag(value):
    with pytest.raises(UserError, match=r"^--lr: "):
        positive_finite(value, "--lr")


def test_positive_finite_and_ranges_accept_good_values():
    assert positive_finite("1e-3", "--lr") == 1e-3
    assert at_least(0, 0, "--num-workers") == 0
    assert in_range(20, 1, 36000, "--seconds") == 20
    with pytest.raises(UserError, match="--val-every: must be >= 1, got 0"):
        at_least(0, 1, "--val-every")
    with pytest.raises(UserError, match="--seconds: expected 1 to 36000, got -1"):
        in_range(-1, 1, 36000, "--seconds")


# --- hardware -----------------------------------------------------------------------------------------------
def test_cpu_devices_beyond_the_machine_are_refused():
    with pytest.raises(UserError, match=rf"--devices 99: this machine has {cpu_count()} CPUs"):
        check_devices("99", "cpu")
    for bad in ("0", "-2", "0,1"):
        with pytest.raises(UserError, match="--devices"):
            check_devices(bad, "cpu")
    assert check_devices("1", "cpu") == 1
    assert check_devices("-1", "cpu") == cpu_count()
    assert check_devices("auto", "cpu") == "auto"
    with pytest.raises(UserError, match="expected a number"):
        check_devices("two", "cpu")


def test_gpu_devices_are_counted(monkeypatch):
    monkeypatch.setattr("ssm_core.validation.cuda_count", lambda: 2)
    assert check_devices("0,1", "gpu") == [0, 1]
    assert check_devices("2", "gpu") == 2
    with pytest.raises(UserError, match="no GPU 2 here"):
        check_devices("0,2", "gpu")
    with pytest.raises(UserError, match="listed twice"):
        check_devices("1,1", "gpu")
    with pytest.raises(UserError, match="this machine has 2 GPUs"):
        check_devices(8, "gpu")


def test_precision_and_strategy():
    for ok in (None, "32-true", "bf16-mixed", "16-mixed", "32", "bf16"):
        check_precision(ok, "cpu")
    with pytest.raises(UserError, match="--precision: expected one of .*bf16-mixed.*got '7'"):
        check_precision("7", "cpu")
    with pytest.raises(UserError, match="needs a CUDA GPU"):
        check_precision("transformer-engine", "cpu")
    check_strategy("auto", "cpu")
    check_strategy("ddp", "cpu")
    check_strategy("fsdp", "gpu")
    with pytest.raises(UserError, match="--strategy fsdp: needs CUDA GPUs"):
        check_strategy("fsdp", "cpu")
    with pytest.raises(UserError, match="--strategy: unknown strategy 'magic'"):
        check_strategy("magic", "cpu")


# --- a whole config -----------------------------------------------------------------------------------------
@dataclass
class _Optim:
    lr: float = 1e-3
    weight_decay: float = 0.1


@dataclass
class _Cfg:
    output_dir: str = "out"
    max_steps: int = -1
    max_epochs: int | None = None
    batch_size: int = 8
    accelerator: str = "cpu"
    devices: str = "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str | None = None
    seed: int = 0
    num_workers: int = 0
    lr: float = 1e-3
    val_every: int = 10
    n_mels: int = 40
    optim: _Optim = field(default_factory=_Optim)


@pytest.mark.parametrize("change, message", [
    ({"lr": float("nan")}, "--lr: must be a finite number, got nan"),
    ({"lr": float("inf")}, "--lr: must be a finite number, got inf"),
    ({"lr": -1.0}, "--lr: must be > 0, got -1.0"),
    ({"optim": _Optim(lr=0.0)}, "--optim.lr: must be > 0"),
    ({"optim": _Optim(weight_decay=float("nan"))}, "--optim.weight_decay: must be a finite number"),
    ({"precision": "7"}, "--precision: expected one of"),
    ({"strategy": "fsdp"}, "--strategy fsdp: needs CUDA GPUs"),
    ({"num_workers": -1}, "--num-workers: must be >= 0, got -1"),
    ({"val_every": 0}, "--val-every: must be >= 1, got 0"),
    ({"n_mels": 0}, "--n-mels: must be >= 1, got 0"),
    ({"devices": "99"}, "--devices 99: this machine has"),
    ({"max_steps": 0}, "--max-steps: must be >= 1 (or -1"),
    ({"seed": -5}, "--seed: expected 0 to"),
    ({"accelerator": "tpu"}, "--accelerator: expected cpu, gpu or auto"),
])
def test_validate_run_names_the_flag(tmp_path, change, message):
    cfg = _Cfg(output_dir=str(tmp_path / "out"), **change)
    with pytest.raises(UserError) as e:
        validate_run(cfg)
    assert message in str(e.value)


def test_validate_run_accepts_a_good_config_and_creates_nothing(tmp_path):
    cfg = _Cfg(output_dir=str(tmp_path / "new" / "out"), devices="1")
    assert validate_run(cfg) == {"accelerator": "cpu", "devices": 1}
    assert validate_run(SimpleNamespace(lr=0.5, devices="auto", accelerator="auto"))["accelerator"] in ("cpu", "gpu")
    assert list(tmp_path.iterdir()) == []
    validate_run(SimpleNamespace(val_check_interval=0.25, ckpt_every=5))
    with pytest.raises(UserError, match="--val-check-interval: must be > 0"):
        validate_run(SimpleNamespace(val_check_interval=0.0))


def test_validate_run_refuses_an_output_dir_or_cache_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match="--synth-cache .*: exists and is not a folder"):
        validate_run(SimpleNamespace(synth_cache=str(tmp_path / "f")))
    with pytest.raises(UserError, match="--cache-dir .*: exists and is not a folder"):
        validate_run(SimpleNamespace(cache_dir=str(tmp_path / "f")))
    validate_run(SimpleNamespace(cache_dir=None, synth_cache=str(tmp_path / "new")))
    with pytest.raises(UserError, match="--output-dir .*: exists and is not a folder"):
        validate_run(_Cfg(output_dir=str(tmp_path / "f")))
    with pytest.raises(UserError, match="is a file, not a folder"):
        validate_run(_Cfg(output_dir=str(tmp_path / "f" / "sub")))


# --- paths --------------------------------------------------------------------------------------------------
def test_distinct_paths_sees_through_names_links_and_hard_links(tmp_path):
    data = tmp_path / "data.csv"
    data.write_text("a\n1\n")
    (tmp_path / "link.csv").symlink_to(data)
    os.link(data, tmp_path / "hard.csv")
    for out in (data, tmp_path / "sub" / ".." / "data.csv", tmp_path / "link.csv", tmp_path / "hard.csv"):
        (tmp_path / "sub").mkdir(exist_ok=True)
        with pytest.raises(UserError, match="--output .*: is the input --csv"):
            distinct_paths(data, out, ("--csv", "--output"))
    distinct_paths(data, tmp_path / "other.csv", ("--csv", "--output"))
    assert data.read_text() == "a\n1\n"


def test_output_and_cache_paths(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="--synth-cache .*: exists and is not a folder"):
        cache_folder(tmp_path / "file", "--synth-cache")
    with pytest.raises(UserError, match="is a file, not a folder"):
        cache_folder(tmp_path / "file" / "sub", "--synth-cache")
    assert cache_folder(None, "--synth-cache") is None
    assert cache_folder(tmp_path / "new", "--synth-cache") == tmp_path / "new"
    with pytest.raises(UserError, match="--output .*: is a folder"):
        output_file(tmp_path, "--output")
    assert output_file(tmp_path / "a" / "b.csv", "--output") == tmp_path / "a" / "b.csv"
    assert not (tmp_path / "a").exists()


def test_unwritable_folder_is_one_line(tmp_path, monkeypatch):
    def refuse(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr("ssm_core.validation.tempfile.mkstemp", refuse)
    with pytest.raises(UserError, match=r"--output-dir .*: not writable \(Read-only file system\)"):
        writable_folder(tmp_path / "out", "--output-dir")


# --- the output folder policy --------------------------------------------------------------------------------
OWNED = ("checkpoints", "metrics.json")


def test_new_folder_is_marked_and_a_foreign_one_refused_untouched(tmp_path):
    out = prepare_run_dir(tmp_path / "run", owned=OWNED, program="test")
    assert json.loads((out / MARKER).read_text()) == {"tool": "long-ssm", "program": "test", "owned": list(OWNED)}
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    for kw in ({}, {"overwrite": True}, {"resume": True}):
        with pytest.raises(UserError, match="not empty .*thesis.tex.* not a folder of an earlier run"):
            prepare_run_dir(foreign, owned=OWNED, **kw)
    assert [p.name for p in foreign.iterdir()] == ["thesis.tex"]


def test_earlier_run_needs_resume_or_overwrite(tmp_path):
    run = prepare_run_dir(tmp_path / "run", owned=OWNED)
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.ckpt").write_text("ckpt")
    (run / "metrics.json").write_text("{}")
    (run / "notes.txt").write_text("the user's")
    (run / "checkpoints" / ".last.ckpt.abcd_123.tmp").write_text("half")
    (run / ".keep.tmp").write_text("a user's dotfile")   # not our temp-file pattern: kept
    with pytest.raises(UserError, match="holds an earlier run; pass --resume .* or --overwrite"):
        prepare_run_dir(run, owned=OWNED)
    with pytest.raises(UserError, match="give one of them"):
        prepare_run_dir(run, owned=OWNED, resume=True, overwrite=True)
    prepare_run_dir(run, owned=OWNED, resume=True)
    assert (run / "checkpoints" / "last.ckpt").read_text() == "ckpt"
    assert not (run / "checkpoints" / ".last.ckpt.abcd_123.tmp").exists()
    prepare_run_dir(run, owned=("model",), overwrite=True)   # the earlier run's entries go too
    assert sorted(p.name for p in run.iterdir()) == [".keep.tmp", MARKER, "notes.txt"]
    assert json.loads((run / MARKER).read_text())["owned"] == ["model"]


def test_a_folder_of_only_our_outputs_counts_as_a_run(tmp_path):
    legacy = tmp_path / "old-run"
    (legacy / "checkpoints").mkdir(parents=True)
    (legacy / "checkpoints" / "last.ckpt").write_text("ckpt")
    with pytest.raises(UserError, match="holds an earlier run"):
        prepare_run_dir(legacy, owned=OWNED)
    prepare_run_dir(legacy, owned=OWNED, resume=True)
    assert (legacy / "checkpoints" / "last.ckpt").read_text() == "ckpt" and (legacy / MARKER).is_file()
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "metrics.json").write_text("{}")
    (tmp_path / "mixed" / "data.csv").write_text("a\n")
    with pytest.raises(UserError, match="not a folder of an earlier run"):
        prepare_run_dir(tmp_path / "mixed", owned=OWNED, overwrite=True)
    assert sorted(p.name for p in (tmp_path / "mixed").iterdir()) == ["data.csv", "metrics.json"]


def test_overwrite_removes_only_the_files_a_run_owns_inside_a_shared_folder(tmp_path):
    owned = ("checkpoints", "model/config.json", "model/model.safetensors")
    run = prepare_run_dir(tmp_path / "run", owned=owned)
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.ckpt").write_text("ckpt")
    (run / "model").mkdir()
    for name in ("config.json", "model.safetensors", "NOTES.md"):
        (run / "model" / name).write_text(name)
    prepare_run_dir(run, owned=owned, overwrite=True)
    assert not (run / "checkpoints").exists() and sorted(p.name for p in (run / "model").iterdir()) == ["NOTES.md"]
    # a folder of an unmarked run holding model/ (a file-level owned entry) still counts as ours
    legacy = tmp_path / "legacy"
    (legacy / "model").mkdir(parents=True)
    (legacy / "model" / "config.json").write_text("{}")
    prepare_run_dir(legacy, owned=owned, overwrite=True)
    assert not (legacy / "model" / "config.json").exists()


def test_save_pretrained_keeps_other_files_of_its_folder(tmp_path):
    from ssm_core import MambaConfig, MambaLM, from_pretrained
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "NOTES.md").write_text("mine")
    model = MambaLM(MambaConfig(d_model=8, n_layer=1, d_state=4, vocab_size=12))
    model.save_pretrained(folder)
    model.save_pretrained(folder)           # over its own earlier files
    assert (folder / "NOTES.md").read_text() == "mine"
    assert sorted(p.name for p in folder.iterdir()) == ["NOTES.md", "config.json", "model.safetensors"]
    loaded = from_pretrained(folder)
    torch.testing.assert_close(loaded.state_dict(), model.state_dict())


def test_resume_needs_an_earlier_run(tmp_path):
    with pytest.raises(UserError, match="no earlier run here"):
        prepare_run_dir(tmp_path / "run", resume=True)


def test_remove_stale_tmp_only_removes_our_pattern(tmp_path):
    names = [".metrics.json.k2j4_9xq.tmp", ".model.safetensors.00000000.tmp", "data.tmp", ".x.tmp", ".a.b.tmp"]
    for n in names:
        (tmp_path / n).write_text("")
    removed = sorted(p.name for p in remove_stale_tmp(tmp_path))
    assert removed == sorted(names[:2])


# --- the last-resort handler --------------------------------------------------------------------------------
def test_one_line_and_exit_codes():
    assert one_line(UserError("--lr: bad")) == "--lr: bad"
    assert exit_code(UserError("x")) == 2
    err = OSError(errno.EROFS, "Read-only file system", "/mnt/ro/out.wav")
    assert one_line(err) == "/mnt/ro/out.wav: read-only file system" and exit_code(err) == 2
    full = OSError(errno.ENOSPC, "No space left on device", "/runs/a/checkpoints/.last.ckpt.x1_abc9z.tmp")
    assert one_line(full) == "/runs/a/checkpoints/last.ckpt: no space left on the device"
    boom = RuntimeError("shape mismatch\nlong details")
    boom.add_note("while loading the checkpoint")
    line = one_line(boom)
    assert line.startswith("RuntimeError: shape mismatch (an unexpected error; rerun with --debug")
    assert line.endswith("; while loading the checkpoint") and "\n" not in line
    assert exit_code(boom) == 1
    assert "out of memory: try a smaller --batch-size" in one_line(MemoryError())
    mismatch = RuntimeError("Error(s) in loading state_dict for M:\n\tsize mismatch for w: copying a param with "
                            "shape (16,) from checkpoint, the shape in current model is (8,).\n\tmore")
    line = one_line(mismatch)
    assert line.startswith("RuntimeError: Error(s) in loading state_dict for M: size mismatch for w: copying")
    assert "--resume needs the model options of the run that wrote it" in line and "more" not in line
    assert len(one_line(ValueError("x" * 1000))) < 450
    assert exit_code(KeyboardInterrupt()) == 130


def test_guard_prints_one_line_and_debug_reraises(capsys, monkeypatch):
    monkeypatch.delenv("SSM_DEBUG", raising=False)
    monkeypatch.setattr(sys, "argv", ["prog"])

    def crash():
        raise ZeroDivisionError("division by zero")
    assert guard(crash, "python -m x")() == 1
    err = capsys.readouterr().err.splitlines()
    assert err == ["python -m x: error: ZeroDivisionError: division by zero (an unexpected error; rerun with "
                   "--debug (or SSM_DEBUG=1) to see the traceback)"]
    assert guard(lambda: None, "p")() == 0
    with pytest.raises(ZeroDivisionError):
        guard(crash, "p", debug=True)()
    monkeypatch.setenv("SSM_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        guard(crash, "p")()
    monkeypatch.setenv("SSM_DEBUG", "0")
    assert guard(crash, "p")() == 1
    with pytest.raises(SystemExit):   # --help and friends pass through
        report(SystemExit(0), "p")
    assert strip_debug_flag(["--lr", "1", "--debug"]) == (["--lr", "1"], True)
    capsys.readouterr()
    stdout = sys.stdout
    try:
        assert report(BrokenPipeError(errno.EPIPE, "Broken pipe"), "p") == 141
    finally:
        sys.stdout.close()
        sys.stdout = stdout
    assert capsys.readouterr().err == ""


# --- callbacks ----------------------------------------------------------------------------------------------
def _tiny_module(nan_after: int | None = None, val_count: float = 4.0, val_loss: float | None = None):
    import lightning as L

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(4, 1)

        def training_step(self, batch, i):
            loss = self.layer(batch[0]).pow(2).mean()
            if nan_after is not None and self.global_step >= nan_after:
                loss = loss * float("nan")
            self.log("train_loss", loss)
            return loss

        def validation_step(self, batch, i):
            loss = self.layer(batch[0]).pow(2).mean()
            self.log("val_loss", loss if val_loss is None else torch.tensor(val_loss))
            self.log("val_tokens", val_count)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    return Tiny()


def _loader(n=64):
    ds = torch.utils.data.TensorDataset(torch.randn(n, 4))
    return torch.utils.data.DataLoader(ds, batch_size=8)


def _trainer(tmp_path, callbacks, max_steps=6, **kw):
    import lightning as L
    return L.Trainer(default_root_dir=tmp_path, max_steps=max_steps, accelerator="cpu", devices=1, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     callbacks=callbacks, **kw)


def test_finite_guard_stops_on_a_nan_training_loss(tmp_path):
    from ssm_core.callbacks import FiniteGuard, NonFiniteError
    trainer = _trainer(tmp_path, [FiniteGuard()], limit_val_batches=0)
    with pytest.raises(NonFiniteError, match="training loss is nan at step 3"):
        trainer.fit(_tiny_module(nan_after=2), _loader())
    assert isinstance(NonFiniteError("x"), UserError)


def test_finite_guard_checks_validation_metrics_and_empty_validation(tmp_path):
    from ssm_core.callbacks import FiniteGuard, NonFiniteError
    with pytest.raises(NonFiniteError, match="validation saw nothing \\(val_tokens = 0\\)"):
        _trainer(tmp_path, [FiniteGuard(count_metric="val_tokens")], num_sanity_val_steps=0,
                 val_check_interval=2).fit(_tiny_module(val_count=0.0), _loader(), _loader(16))
    with pytest.raises(NonFiniteError, match="validation val_loss is inf"):
        _trainer(tmp_path, [FiniteGuard()], num_sanity_val_steps=0, val_check_interval=2).fit(
            _tiny_module(val_loss=float("inf")), _loader(), _loader(16))
    # A healthy run passes untouched.
    _trainer(tmp_path, [FiniteGuard(count_metric="val_tokens")], val_check_interval=2).fit(
        _tiny_module(), _loader(), _loader(16))


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_checkpoint_saves_and_exits_non_zero(tmp_path, signum, code):
    import lightning as L

    from ssm_core.callbacks import SignalCheckpoint
    from ssm_core.errors import one_line as line_of

    class KillAt(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 3:
                os.kill(os.getpid(), signum)

    before = signal.getsignal(signal.SIGINT)
    trainer = _trainer(tmp_path, [SignalCheckpoint(tmp_path / "checkpoints"), KillAt()], max_steps=50,
                       limit_val_batches=0)
    with pytest.raises(SystemExit) as e:
        trainer.fit(_tiny_module(), _loader(400))
    assert e.value.code == code
    assert line_of(e.value).startswith(f"stopped by {signal.Signals(signum).name}; checkpoint saved at step 3")
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 3
    assert signal.getsignal(signal.SIGINT) == before


def test_signal_checkpoint_keeps_checkpoints_of_a_finished_run_and_saves_nothing_on_errors(tmp_path):
    from ssm_core.callbacks import FiniteGuard, NonFiniteError, SignalCheckpoint
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    (ckpts / "last.ckpt").write_text("from an earlier segment")
    _trainer(tmp_path, [SignalCheckpoint(ckpts)], limit_val_batches=0).fit(_tiny_module(), _loader())
    assert (ckpts / "last.ckpt").read_text() == "from an earlier segment"
    with pytest.raises(NonFiniteError):
        _trainer(tmp_path, [SignalCheckpoint(ckpts), FiniteGuard()], limit_val_batches=0).fit(
            _tiny_module(nan_after=1), _loader())
    assert (ckpts / "last.ckpt").read_text() == "from an earlier segment"


def test_signal_checkpoint_ignores_sigint_in_forked_workers(tmp_path):
    from ssm_core.callbacks import SignalCheckpoint
    cb = SignalCheckpoint(tmp_path)
    cb._pid = os.getpid() + 1        # as seen from a data-loader worker forked after training started
    cb._on_sigint(signal.SIGINT, None)
    assert cb.signum is None
    cb._pid = os.getpid()
    calls = []
    previous = signal.signal(signal.SIGTERM, lambda *a: calls.append(a[0]))
    try:
        cb._on_sigint(signal.SIGINT, None)       # first Ctrl-C: the graceful path (Lightning's SIGTERM handler)
        assert cb.signum == signal.SIGINT and calls == [signal.SIGINT]
        with pytest.raises(KeyboardInterrupt):   # second Ctrl-C: at once
            cb._on_sigint(signal.SIGINT, None)
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_resumable_csv_log_reads_as_one_run(tmp_path):
    import csv

    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from ssm_core.loggers import ResumableCSVLogger

    def fit(root, max_steps, resume_from=None):
        torch.manual_seed(0)
        ckpt = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=4, save_top_k=-1,
                               filename="{step}")
        trainer = L.Trainer(default_root_dir=root, max_steps=max_steps, accelerator="cpu", devices=1,
                            log_every_n_steps=1, enable_progress_bar=False, enable_model_summary=False,
                            limit_val_batches=0, callbacks=[ckpt],
                            logger=ResumableCSVLogger(root, name="logs", version="", resume=resume_from is not None))
        trainer.fit(_tiny_module(), _loader(32), ckpt_path=resume_from)   # 4 batches: step 4 ends an epoch
        with open(root / "logs" / "metrics.csv", newline="") as f:
            return [(int(r["step"]), r["train_loss"]) for r in csv.DictReader(f)]

    whole = fit(tmp_path / "whole", 10)
    fit(tmp_path / "cut", 6)                      # "killed" after step 6; its last checkpoint is at step 4
    resumed = fit(tmp_path / "cut", 10, resume_from=str(tmp_path / "cut" / "ckpt" / "step=4.ckpt"))
    assert [s for s, _ in whole] == list(range(10))
    assert resumed == whole                       # steps 4 and 5 once, the values of the uninterrupted run
    fresh = fit(tmp_path / "cut", 3)              # without resume: CSVLogger's behaviour, a new file
    assert [s for s, _ in fresh] == [0, 1, 2]
