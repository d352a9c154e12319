"""The selectivity demonstration: task generators, a tiny training run, the LTI switch and the CLI."""
import json
import subprocess
import sys

import torch

from ssm_core import Mamba, MambaConfig
from ssm_core.tasks import BLANK, FIRST_DATA, MARKER, TaskConfig, induction_batch, main, selective_copy_batch
from ssm_core.training import OptimConfig


def test_selective_copy_batches_ask_for_the_data_tokens_in_order():
    cfg = TaskConfig(seq_len=20, n_memorize=3, n_tokens=5)
    x, y = selective_copy_batch(cfg, 64, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (64, 23)
    region = x[:, :20]
    assert torch.all(x[:, 20:] == MARKER)
    assert torch.all((region >= FIRST_DATA).sum(1) == 3) and torch.all((region == BLANK).sum(1) == 17)
    for row in range(64):
        data = region[row][region[row] >= FIRST_DATA]
        assert torch.equal(y[row, 20:], data)
    assert torch.all(y[:, :20] == -100)
    positions = [tuple((r >= FIRST_DATA).nonzero().flatten().tolist()) for r in region]
    assert len(set(positions)) > 50  # positions vary between examples: that is what needs selection


def test_induction_batches_end_with_the_trigger_and_ask_for_its_key():
    cfg = TaskConfig(task="induction", seq_len=16, n_tokens=6)
    x, y = induction_batch(cfg, 32, torch.Generator().manual_seed(1))
    assert torch.all(x[:, -1] == MARKER) and torch.all((x == MARKER).sum(1) == 2)
    first = (x == MARKER).float().argmax(1)
    assert torch.equal(y[:, -1], x[torch.arange(32), first + 1])
    assert torch.all(y[:, :-1] == -100)


def test_lti_switch_makes_delta_b_c_independent_of_the_input():
    torch.manual_seed(0)
    lti, sel = Mamba(16, d_state=4, selective=False), Mamba(16, d_state=4)
    a, b = torch.randn(2, 32, 10), torch.randn(2, 32, 10)
    for (da, Ba, Ca), (db, Bb, Cb) in [(lti._ssm_inputs(a), lti._ssm_inputs(b))]:
        assert torch.equal(da, db) and torch.equal(Ba, Bb) and torch.equal(Ca, Cb)
    da, Ba, _ = sel._ssm_inputs(a)
    db, Bb, _ = sel._ssm_inputs(b)
    assert not torch.equal(da, db) and not torch.equal(Ba, Bb)


def test_selective_model_learns_selective_copying(tmp_path):
    # Tiny budget (~30 s on 2 cores); the full comparison with the LTI ablation is in docs/ssm_core.md.
    cfg = TaskConfig(seq_len=16, n_memorize=2, n_tokens=4, model=MambaConfig(d_model=32, n_layer=2, vocab_size=6),
                     optim=OptimConfig(lr=0.01, grad_clip=1.0), batch_size=32, steps=600, eval_examples=512,
                     progress=False, output_dir=str(tmp_path))
    metrics = main(cfg)
    assert metrics["accuracy"] >= 0.9, metrics
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["accuracy"] == metrics["accuracy"] and saved["config"]["model"]["selective"] is True


def test_cli_rejects_bad_flags_in_one_line():
    r = subprocess.run([sys.executable, "-m", "ssm_core.tasks", "selective-copy", "--n-memorize", "99",
                        "--seq-len", "8"], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "--n-memorize" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "ssm_core.tasks", "copy-everything"], capture_output=True, text=True)
    assert r.returncode == 2 and "invalid choice" in r.stderr and r.stderr.strip().count("\n") == 0
    # the flat flags of before name their new place
    r = subprocess.run([sys.executable, "-m", "ssm_core.tasks", "selective-copy", "--no-selective"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().endswith("--no-selective: moved to --model.selective false (see --help)")


def test_n_tokens_sets_the_vocabulary_and_the_lti_switch_reaches_the_model():
    from ssm_core.cli import parse_config
    cfg = parse_config(TaskConfig, ["--task", "induction", "--n-tokens", "9", "--model.selective", "false",
                                    "--model.mixer", "mamba,s4d"])
    assert cfg.model.vocab_size == 11 and cfg.model.selective is False and cfg.model.mixer == ["mamba", "s4d"]
    assert TaskConfig(n_tokens=9).model.vocab_size == 11


def test_shipped_task_configs_parse():
    from pathlib import Path

    from ssm_core.cli import parse_config
    for path in sorted(Path(__file__).resolve().parents[1].glob("configs/ssm_core/*.yaml")):
        cfg = parse_config(TaskConfig, ["--config", str(path), "--steps", "3"])
        assert cfg.steps == 3 and cfg.task in ("selective-copy", "induction") and cfg.model.d_model == 32


def test_device_flag():
    assert TaskConfig(device="cpu").device == "cpu"
    assert TaskConfig(device="auto").device == ("cuda" if torch.cuda.is_available() else "cpu")
    r = subprocess.run([sys.executable, "-m", "ssm_core.tasks", "selective-copy", "--device", "tpu"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "--device" in r.stderr and "Traceback" not in r.stderr
