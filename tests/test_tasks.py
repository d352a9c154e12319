"""The selectivity demonstration: task generators, a tiny training run, the LTI switch and the CLI."""
import json
import math
import subprocess
import sys

import pytest
import torch

from ssm_core import Mamba, MambaConfig, MambaLM
from ssm_core.tasks import BLANK, FIRST_DATA, MARKER, TaskConfig, induction_batch, main, selective_copy_batch
from ssm_core.training import OptimConfig

from .helpers import REPO


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

    from ssm_core.cli import parse_config
    for path in sorted(REPO.glob("configs/ssm_core/*.yaml")):
        cfg = parse_config(TaskConfig, ["--config", str(path), "--steps", "3"])
        assert cfg.steps == 3 and cfg.task in ("selective-copy", "induction") and cfg.model.d_model == 32


def test_device_flag():
    assert TaskConfig(device="cpu").device == "cpu"
    assert TaskConfig(device="auto").device == ("cuda" if torch.cuda.is_available() else "cpu")
    r = subprocess.run([sys.executable, "-m", "ssm_core.tasks", "selective-copy", "--device", "tpu"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "--device" in r.stderr and "Traceback" not in r.stderr


def _tiny(tmp_path, **kw):
    base = dict(seq_len=12, n_memorize=2, n_tokens=4, model=MambaConfig(d_model=16, n_layer=2, vocab_size=6),
                optim=OptimConfig(lr=0.01, grad_clip=1.0), batch_size=8, steps=6, eval_examples=16, progress=False,
                checkpoint_every=2, output_dir=str(tmp_path))
    base.update(kw)
    return TaskConfig(**base)


@pytest.mark.parametrize("initial_state", ["zero", "passed"])
def test_a_run_stopped_by_its_time_limit_resumes_to_the_uninterrupted_result(tmp_path, initial_state):
    from ssm_core.tasks import train
    straight = train(_tiny(tmp_path / "straight", initial_state=initial_state))
    # A time limit this short stops after every step; each --resume continues from the checkpoint (with
    # --initial-state passed, from the carried state too).
    parts = [train(_tiny(tmp_path / "parts", time_limit=1e-6, initial_state=initial_state))]
    while not parts[-1]["complete"]:
        assert parts[-1]["step"] == len(parts)
        parts.append(train(_tiny(tmp_path / "parts", time_limit=1e-6, resume=True, initial_state=initial_state)))
    assert len(parts) == 6
    assert parts[-1]["accuracy"] == straight["accuracy"] and parts[-1]["final_train_loss"] == straight["final_train_loss"]
    a = torch.load(tmp_path / "straight/checkpoints/last.ckpt", weights_only=True)["model"]
    b = torch.load(tmp_path / "parts/checkpoints/last.ckpt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_state_passing_starts_each_batch_from_the_previous_batchs_final_state(tmp_path):
    from ssm_core.tasks import build_model, train
    cfg = _tiny(tmp_path / "run", steps=1, checkpoint_every=1, initial_state="passed", model=MambaConfig(
        d_model=16, n_layer=2, vocab_size=6, mixer=["mamba", "mamba2"], mixer_options={"mamba2": {"headdim": 8}}))
    train(cfg)
    carried = torch.load(tmp_path / "run/checkpoints/last.ckpt", weights_only=True)["carried_state"]
    # The first batch from a zero state, through the weights as initialised (the step updates them after).
    torch.manual_seed(cfg.seed)
    model = build_model(cfg)
    x, _ = selective_copy_batch(cfg, cfg.batch_size, torch.Generator().manual_seed(cfg.seed))
    with torch.no_grad():
        _, want = model.stream(x, model.init_state(cfg.batch_size))
    assert [sorted(t) for t in carried] == [["conv", "ssm"], ["conv", "ssm"]]
    for got, w in zip(carried, want):
        assert torch.allclose(got["ssm"], w.ssm, atol=1e-6) and torch.allclose(got["conv"], w.conv, atol=1e-6)
        assert w.ssm.abs().max() > 0
    with pytest.raises(ValueError, match="--initial-state passed.*attention"):
        _tiny(tmp_path / "att", initial_state="passed", model=MambaConfig(
            d_model=16, n_layer=2, vocab_size=6, mixer=["mamba", "attention"]))


@pytest.mark.parametrize("mixer", ["mamba", "mamba2", "s4d"])
def test_state_passing_trains_through_the_kernels_that_save_the_state_for_backward(tmp_path, monkeypatch, mixer):
    # The Triton conv and scans keep the initial state they read for their backward; `stream` used to write the
    # chunk's final state into that same tensor, and backward refused ("modified by an inplace operation").
    # The kernels run here in Triton's CPU interpreter (conftest), as on a GPU.
    from ssm_core.tasks import train
    monkeypatch.setenv("SSM_CORE_BACKEND", "triton")
    # As small as the kernels allow (each program a batch row's channel block; the interpreter runs them one by
    # one): two steps, so that the second starts from the state the first carried over.
    cfg = _tiny(tmp_path / mixer, steps=2, batch_size=2, eval_examples=2, initial_state="passed", model=MambaConfig(
        d_model=8, n_layer=1, vocab_size=6, mixer=mixer, mixer_options={"mamba2": {"headdim": 8}}))
    assert train(cfg)["step"] == 2


def test_resume_reads_a_checkpoint_written_before_an_option_existed(tmp_path):
    # A checkpoint's options lack those added later: they count as their defaults (a grid's runs resumed
    # across an upgrade).
    from ssm_core.tasks import train
    train(_tiny(tmp_path / "run", steps=2))
    ckpt = tmp_path / "run/checkpoints/last.ckpt"
    state = torch.load(ckpt, weights_only=True)
    del state["options"]["initial_state"], state["carried_state"]
    torch.save(state, ckpt)
    assert train(_tiny(tmp_path / "run", steps=4, resume=True))["step"] == 4
    with pytest.raises(Exception, match="--initial_state"):
        train(_tiny(tmp_path / "run", steps=6, resume=True, initial_state="passed"))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device)")
@pytest.mark.parametrize("initial_state", ["zero", "passed"])
def test_a_cuda_run_resumes_to_the_uninterrupted_result(tmp_path, initial_state):
    # On CUDA the checkpoint is loaded onto the device, the data generator's state included (it must go back
    # to the CPU), and the carried state too.
    from ssm_core.tasks import train
    straight = train(_tiny(tmp_path / "straight", device="cuda", initial_state=initial_state))
    parts = [train(_tiny(tmp_path / "parts", device="cuda", time_limit=1e-6, initial_state=initial_state))]
    while not parts[-1]["complete"]:
        parts.append(train(_tiny(tmp_path / "parts", device="cuda", time_limit=1e-6, resume=True,
                                 initial_state=initial_state)))
    assert len(parts) == 6
    assert parts[-1]["final_train_loss"] == pytest.approx(straight["final_train_loss"], rel=1e-5)


def test_resume_refuses_other_training_options_and_a_run_without_checkpoint(tmp_path):
    import pytest

    from ssm_core.cli import UserError
    from ssm_core.tasks import train
    train(_tiny(tmp_path / "run", steps=2))
    with pytest.raises(UserError, match="--seq_len"):
        train(_tiny(tmp_path / "run", steps=4, seq_len=10, resume=True))
    with pytest.raises(UserError, match="earlier run"):       # the folder is a run: not silently replaced
        train(_tiny(tmp_path / "run", steps=4))
    assert train(_tiny(tmp_path / "run", steps=4, resume=True))["step"] == 4   # --steps may grow
    r = subprocess.run([sys.executable, "-m", "ssm_core.tasks", "selective-copy", "--resume"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "--output-dir" in r.stderr


def test_streamed_and_fused_extrapolation_agree_for_every_mixer():
    from ssm_core.tasks import last_logits
    torch.manual_seed(0)
    x = torch.randint(0, 6, (3, 70))
    for mixer in ("mamba", "mamba2", "attention", "mamba,attention"):
        model = MambaLM(MambaConfig(d_model=16, n_layer=2, vocab_size=6, mixer=mixer)).eval()
        fused = last_logits(model, x, "fused", chunk=16)
        streamed = last_logits(model, x, "stream", chunk=16)
        torch.testing.assert_close(streamed, fused, rtol=1e-4, atol=1e-4, msg=mixer)


def test_induction_extrapolation_reports_every_length_and_mode(tmp_path):
    cfg = TaskConfig(task="induction", seq_len=8, n_tokens=4, model=MambaConfig(d_model=16, n_layer=2, vocab_size=6),
                     steps=3, batch_size=4, eval_examples=8, progress=False, output_dir=str(tmp_path),
                     eval_lengths=[8, 64], eval_mode=["fused", "stream"], eval_length_examples=6, stream_chunk=16,
                     eval_tokens_per_batch=128)
    rows = main(cfg)["extrapolation"]
    assert [(r["length"], r["mode"], r["examples"]) for r in rows] == [
        (8, "fused", 6), (8, "stream", 6), (64, "fused", 6), (64, "stream", 6)]
    # the same examples in both modes, and a model whose logits agree: the same answers
    assert rows[2]["accuracy"] == rows[3]["accuracy"]
    assert json.loads((tmp_path / "metrics.json").read_text())["extrapolation"] == rows


def test_selective_copy_extrapolation_and_init_from_a_shorter_run(tmp_path):
    import pytest

    from ssm_core.cli import UserError
    from ssm_core.tasks import last_logits, train
    short = train(_tiny(tmp_path / "short", steps=4))
    assert short["complete"]
    ckpt = tmp_path / "short/checkpoints/last.ckpt"
    long = train(_tiny(tmp_path / "long", seq_len=40, steps=1, optim=OptimConfig(lr=1e-9), init_from=str(ckpt),
                       eval_lengths=[12, 100], eval_mode=["fused", "stream"], stream_chunk=16))
    rows = long["extrapolation"]
    assert [(r["length"], r["mode"]) for r in rows] == [(12, "fused"), (12, "stream"), (100, "fused"), (100, "stream")]
    # lr 1e-9 for one step: the long run's model is the short run's, so at the short run's length it scores
    # what the short run scored on the same generator seed's examples.
    assert rows[0]["accuracy"] == rows[1]["accuracy"] and rows[2]["accuracy"] == rows[3]["accuracy"]
    model = MambaLM(MambaConfig(d_model=16, n_layer=2, vocab_size=6)).eval()
    x = torch.randint(0, 6, (2, 37))
    torch.testing.assert_close(last_logits(model, x, "stream", chunk=8, k=5), model(x)[:, -5:], rtol=1e-4, atol=1e-4)
    with pytest.raises(UserError, match="--init-from"):
        train(_tiny(tmp_path / "other", model=MambaConfig(d_model=8, n_layer=2, vocab_size=6), init_from=str(ckpt)))
    with pytest.raises(ValueError, match="--init-from"):
        _tiny(tmp_path / "x", init_from=str(tmp_path / "nothing.ckpt"))


def test_grid_stopped_by_its_time_limit_is_finished_by_the_same_command(tmp_path):
    from benchmarks.mixer_tasks import GridConfig
    from benchmarks.mixer_tasks import main as grid
    argv = dict(seq_len=12, n_memorize=2, n_tokens=4, steps=4, batch_size=4, lrs=[0.01], seeds=[0],
                mixers=["Mamba", "Mamba-2"], eval_examples=8, eval_lengths=[12, 48], eval_mode=["fused", "stream"],
                eval_length_examples=4, device="cpu", workers=1, out_dir=str(tmp_path / "grid"))
    first = grid(GridConfig(**argv, time_limit=1e-6))
    assert [u["step"] for u in first["unfinished"]] == [1, 1] and not first["runs"]
    second = grid(GridConfig(**argv))
    assert not second["unfinished"] and [r["step"] for r in second["runs"]] == [4, 4]
    saved = json.loads((tmp_path / "grid/mixer_tasks.json").read_text())
    assert [r["label"] for r in saved["runs"]] == ["Mamba", "Mamba-2"]
    assert (tmp_path / "grid/mixer_tasks.png").is_file() and (tmp_path / "grid/mixer_tasks_lengths.png").is_file()
    # the same command with more --steps continues the finished runs from their checkpoints
    longer = grid(GridConfig(**{**argv, "steps": 6}))
    assert not longer["unfinished"] and [r["step"] for r in longer["runs"]] == [6, 6]
    assert grid(GridConfig(**{**argv, "steps": 6}))["runs"] == longer["runs"]     # and then leaves them
    # stage two: each run starts from its namesake of the first grid
    stage2 = grid(GridConfig(**{**argv, "seq_len": 24, "out_dir": str(tmp_path / "grid2")},
                             init_from_grid=str(tmp_path / "grid")))
    assert stage2["runs"][0]["config"]["init_from"].endswith("mamba-lr0.01-s0/checkpoints/last.ckpt")


def test_a_failed_run_does_not_lose_the_grids_other_results(tmp_path, monkeypatch):
    """One run failing (the H100 grid: CUDA out of memory in one evaluation) still writes the others'
    results, lists the failure, and then ends the command with an error naming it."""
    from benchmarks import mixer_tasks
    real = mixer_tasks._run

    def oom_for_mamba2(kwargs):
        if kwargs["model"]["mixer"] == "mamba2":
            raise MemoryError("CUDA out of memory")
        return real(kwargs)
    monkeypatch.setattr(mixer_tasks, "_run", oom_for_mamba2)
    cfg = mixer_tasks.GridConfig(seq_len=12, n_memorize=2, n_tokens=4, steps=2, batch_size=4, lrs=[0.01], seeds=[0],
                                 mixers=["Mamba-2", "Mamba"], eval_examples=8, device="cpu", workers=1,
                                 out_dir=str(tmp_path / "grid"))
    with pytest.raises(RuntimeError, match="1 of 2 runs failed.*Mamba-2 lr 0.01 seed 0: MemoryError"):
        mixer_tasks.main(cfg)
    saved = json.loads((tmp_path / "grid/mixer_tasks.json").read_text())
    assert [r["label"] for r in saved["runs"]] == ["Mamba"] and saved["runs"][0]["step"] == 2
    assert [f["label"] for f in saved["failed"]] == ["Mamba-2"]
    assert (tmp_path / "grid/mixer_tasks.png").is_file()


def test_sigterm_saves_the_checkpoint_and_the_run_resumes(tmp_path, monkeypatch):
    import os
    import signal

    import pytest
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from ssm_core import tasks
    from ssm_core.errors import exit_code
    real, calls = tasks.BATCHES["selective-copy"], []

    def batch_then_sigterm(*a, **k):
        calls.append(1)
        if len(calls) == 3:     # during the third step
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **k)
    monkeypatch.setitem(tasks.BATCHES, "selective-copy", batch_then_sigterm)
    with pytest.raises(SIGTERMException) as stopped:
        tasks.train(_tiny(tmp_path, checkpoint_every=100))
    assert exit_code(stopped.value) == 143
    assert torch.load(tmp_path / "checkpoints/last.ckpt", weights_only=True)["step"] == 3
    monkeypatch.setitem(tasks.BATCHES, "selective-copy", real)
    assert tasks.train(_tiny(tmp_path, resume=True))["step"] == 6


def test_memory_horizon_time_constants_and_report(tmp_path):
    """With Delta's input weights zeroed, Delta is softplus(dt bias) on every token, so each state's time
    constant is 1 / (exp(A_log) * softplus(bias)) exactly; the report reads a finished run of the task CLI."""
    from benchmarks import memory_horizon
    from ssm_core.tasks import main as task_main
    torch.manual_seed(0)
    m = Mamba(16, d_state=4)
    with torch.no_grad():
        m.dt_proj.weight.zero_()
    h, filler = torch.randn(2, 10, 16), torch.rand(2, 10) > 0.3
    expected = 1 / (m.A_log.exp() * torch.nn.functional.softplus(m.dt_proj.bias)[:, None])
    torch.testing.assert_close(memory_horizon.layer_time_constants(m, h, filler), expected.detach())

    task_main(_tiny(tmp_path / "run", task="induction", steps=2))
    out = memory_horizon.main(memory_horizon.HorizonConfig(run=str(tmp_path / "run"), length=32, examples=2))
    assert [r["layer"] for r in out["layers"]] == [0, 1]
    assert all(r["slowest_tau_tokens"][0] >= r["median_tau_tokens"] > 0 for r in out["layers"])
    saved = json.loads((tmp_path / "run/memory_horizon.json").read_text())["layers"][1]
    assert saved["slowest_keeps"]["2^12"] == pytest.approx(math.exp(-4096 / saved["slowest_tau_tokens"][0]))
    from ssm_core.cli import UserError
    with pytest.raises(UserError, match="metrics.json is missing"):
        memory_horizon.main(memory_horizon.HorizonConfig(run=str(tmp_path / "nothing")))


def test_grid_mixer_options_reach_every_model_and_a_wrong_name_is_one_error(tmp_path):
    from benchmarks.mixer_tasks import GridConfig
    from benchmarks.mixer_tasks import main as grid
    with pytest.raises(ValueError, match="--mixer-options.*Mamba: .*dt_mn"):
        GridConfig(mixers=["Mamba"], mixer_options={"mamba": {"dt_mn": 1e-5}})
    out = grid(GridConfig(task="induction", seq_len=12, n_tokens=4, steps=1, batch_size=4, lrs=[0.01], seeds=[0],
                          mixers=["Mamba"], eval_examples=8, device="cpu", workers=1, out_dir=str(tmp_path / "g"),
                          mixer_options={"mamba": {"dt_min": 1e-5, "dt_init_floor": 1e-6}}))
    assert out["runs"][0]["config"]["model"]["mixer_options"] == {"mamba": {"dt_min": 1e-5, "dt_init_floor": 1e-6}}
