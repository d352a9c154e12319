"""The shared layer: the one training recipe (parameter groups, warm-up + cosine) and the jsonargparse CLI
(nested groups, old spellings, one-line errors, --config / --print_config round trip)."""
import math
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Literal

import pytest
import torch

from ssm_core import MambaConfig, MambaLM
from ssm_core.callbacks import step_seed
from ssm_core.cli import UserError, dump_config, parse_config, run
from ssm_core.training import (
    EpochBatches,
    OptimConfig,
    ema_with_warmup,
    make_optimizer,
    parameter_groups,
    warmup_cosine,
)


def test_no_weight_decay_on_a_log_d_norms_and_biases():
    model = MambaLM(MambaConfig(d_model=16, n_layer=2, vocab_size=5, mixer="mamba,mamba2"))
    decay, no_decay = parameter_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert decayed | kept == set(names.values()) and not decayed & kept
    for name in names.values():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("A_log", "D", "bias", "dt_bias") or "norm" in name:
            assert name in kept, name
    assert any(n.endswith("A_log") for n in kept) and any(n.endswith(".D") for n in kept)
    assert any("norm" in n for n in kept) and any(n.endswith("bias") for n in kept)
    # the weight matrices are decayed (in_proj, out_proj, x_proj, conv, embedding)
    assert any(n.endswith("in_proj.weight") for n in decayed) and any(n.endswith("out_proj.weight") for n in decayed)
    assert all(p.dim() >= 2 for p in decay["params"])


def test_a_2d_parameter_marked_no_weight_decay_is_not_decayed():
    lin = torch.nn.Linear(4, 4)
    lin.weight._no_weight_decay = True
    decay, no_decay = parameter_groups(lin, 0.1)
    assert decay["params"] == [] and len(no_decay["params"]) == 2


def test_lr_scale_gives_a_submodule_its_own_lr_with_the_same_decay_rule_and_schedule():
    model = torch.nn.ModuleDict({"backbone": torch.nn.Linear(3, 3), "backbone2": torch.nn.Linear(3, 3),
                                 "head": torch.nn.LayerNorm(3)})
    groups = parameter_groups(model, 0.1, {"backbone": 0.25})
    by_param = {id(p): (g["lr_scale"], g["weight_decay"]) for g in groups for p in g["params"]}
    got = {n: by_param[id(p)] for n, p in model.named_parameters()}
    # a name prefix matches whole submodule names only: "backbone2" keeps the base lr
    assert got == {"backbone.weight": (0.25, 0.1), "backbone.bias": (0.25, 0.0), "backbone2.weight": (1.0, 0.1),
                   "backbone2.bias": (1.0, 0.0), "head.weight": (1.0, 0.0), "head.bias": (1.0, 0.0)}
    opt, sched, _ = make_optimizer(model, OptimConfig(lr=0.4, warmup_steps=2), total_steps=10,
                                   lr_scale={"backbone": 0.25})
    steps = []
    for _ in range(4):
        assert len({(g["lr_scale"], g["lr"]) for g in opt.param_groups}) == 2   # a pair shares its lr
        steps.append({g["lr_scale"]: g["lr"] for g in opt.param_groups})
        opt.step()
        sched.step()
    assert steps[:2] == [{1.0: 0.2, 0.25: 0.05}, {1.0: 0.4, 0.25: 0.1}]     # one warm-up + cosine, both scaled
    assert steps[3][0.25] == pytest.approx(0.25 * steps[3][1.0]) and steps[3][1.0] < 0.4


def test_warmup_cosine_schedule():
    f = warmup_cosine(warmup_steps=4, total_steps=14, min_lr_ratio=0.1)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0) and f(9) == pytest.approx(0.1 + 0.9 * 0.5)
    assert f(14) == pytest.approx(0.1) and f(100) == pytest.approx(0.1)
    model = torch.nn.Linear(3, 3)
    opt, sched, interval = make_optimizer(model, OptimConfig(lr=0.5, warmup_steps=2), total_steps=10)
    assert interval == "step"
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:2] == [0.25, 0.5] and lrs[-1] == pytest.approx(0.5 * 0.5 * (1 + math.cos(math.pi * 7 / 8)))
    opt, sched, interval = make_optimizer(model, OptimConfig(lr=1.0, schedule="exponential", lr_decay=0.5), 10)
    opt.step()
    sched.step()
    assert interval == "epoch" and opt.param_groups[0]["lr"] == 0.5


def test_optim_config_validates():
    for bad in (dict(lr=0), dict(weight_decay=-1), dict(min_lr_ratio=2), dict(lr_decay=0)):
        with pytest.raises(ValueError, match="--optim."):
            OptimConfig(**bad)


@dataclass
class Flat:
    """A flat config (as the genomics score / embed CLIs have): still a CLI with no change."""
    checkpoint: str = ""
    window: int = 2048
    context_lengths: list[int] = field(default_factory=lambda: [1024])
    names: list[str] | None = None
    both_strands: bool = True
    verbose: bool = False
    split: Literal["valid", "test"] = "valid"

    def __post_init__(self):
        if self.window < 1:
            raise ValueError(f"--window: must be >= 1, got {self.window}")


@dataclass
class Nested:
    output_dir: str = "runs/x"
    model: MambaConfig = field(default_factory=lambda: MambaConfig(d_model=32, vocab_size=7))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=0.01, betas=(0.9, 0.95)))


def test_flat_config_flags_keep_their_spellings():
    cfg = parse_config(Flat, ["--checkpoint", "m", "--context-lengths", "32", "128", "--names", "a", "b,c",
                              "--no-both-strands", "--verbose", "--split", "test"])
    assert cfg == Flat(checkpoint="m", context_lengths=[32, 128], names=["a", "b,c"], both_strands=False,
                       verbose=True, split="test")
    assert parse_config(Flat, ["--context_lengths", "[8, 9]", "--window=7"]).context_lengths == [8, 9]
    for argv, match in ((["--window", "0"], "--window: must be >= 1"),
                        (["--window", "x"], "--window: invalid value 'x'"),
                        (["--split", "train"], "--split: invalid choice 'train'"),
                        (["--nope", "1"], "unrecognized option --nope"),
                        (["--verbose", "maybe"], "--verbose")):
        with pytest.raises(UserError, match=match):
            parse_config(Flat, argv)


def test_nested_groups_yaml_and_round_trip(tmp_path):
    (tmp_path / "c.yaml").write_text("model:\n  d_state: 4\n  mixer_options: {mamba: {conv_bias: false}}\n"
                                     "optim: {lr: 0.5}\n")
    cfg = parse_config(Nested, ["--config", str(tmp_path / "c.yaml"), "--model.d-model", "48"])
    assert (cfg.model.d_state, cfg.model.d_model, cfg.model.vocab_size) == (4, 48, 7)
    assert cfg.model.mixer_options == {"mamba": {"conv_bias": False}}
    assert cfg.optim.lr == 0.5 and cfg.optim.betas == (0.9, 0.95)     # the rest of the group's default kept
    (tmp_path / "round.yaml").write_text(dump_config(cfg))
    assert parse_config(Nested, ["--config", str(tmp_path / "round.yaml")]) == cfg
    for argv, match in ((["--d-state", "4"], "--d-state: moved to --model.d_state"),
                        (["--lr", "1"], "--lr: moved to --optim.lr"),
                        (["--model.d_state", "0.5"], "--model.d_state: invalid value"),
                        (["--model", "x"], "--model: give the group's fields")):
        with pytest.raises(UserError, match=match):
            parse_config(Nested, argv)
    (tmp_path / "old.yaml").write_text("d_model: 8\n")
    with pytest.raises(UserError, match="unknown option 'd_model' .moved to 'model.d_model'"):
        parse_config(Nested, ["--config", str(tmp_path / "old.yaml")])
    (tmp_path / "bad.yaml").write_text("model: [1\n")
    with pytest.raises(UserError, match="not valid YAML"):
        parse_config(Nested, ["--config", str(tmp_path / "bad.yaml")])


def test_run_prints_one_line_and_debug_shows_the_traceback(capsys):
    assert run(lambda cfg: None, Flat, ["--window", "0"], prog="p") == 2
    assert capsys.readouterr().err.strip() == "p: error: --window: must be >= 1, got 0"
    with pytest.raises(UserError):
        run(lambda cfg: None, Flat, ["--window", "0", "--debug"], prog="p")


def test_print_config_prints_the_resolved_config():
    r = subprocess.run([sys.executable, "-m", "genomics.pretrain", "--model.d_state", "4", "--print_config"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "  d_state: 4\n" in r.stdout and "keep_softmask: true\n" in r.stdout and "vocab_size" not in r.stdout


# --- EpochBatches ---------------------------------------------------------------------------------------
def _at(n: int, batch_size: int, seed: int = 0, step: int = 0, world: int = 1, rank: int = 0, **kw):
    """An EpochBatches of a trainer at `step` (the trainer's fields it reads only)."""
    trainer = SimpleNamespace(global_step=step, world_size=world, global_rank=rank)
    return EpochBatches(n, batch_size, seed, trainer, **kw)


def _epoch(sampler: EpochBatches, epoch: int) -> list[list[int]]:
    sampler.trainer.global_step = epoch * len(sampler)
    return list(sampler)


def test_epoch_batches_without_weights_are_the_permutations_of_before():
    """The order runs have always had (a run started before weights existed resumes with the same batches):
    epoch e is torch.randperm(n) seeded by step_seed(seed, e); rank r takes every world-th item from r."""
    n, bs, seed = 103, 8, 7
    for world, drop_last in ((1, True), (1, False), (3, False)):
        for rank in range(world):
            s = _at(n, bs, seed, world=world, rank=rank, drop_last=drop_last)
            for epoch in (0, 2):
                order = torch.randperm(n, generator=torch.Generator().manual_seed(step_seed(seed, epoch)))
                mine = order[rank::world][:n // world]
                assert _epoch(s, epoch) == [mine[b * bs:(b + 1) * bs].tolist() for b in range(len(s))]


def test_weighted_epochs_draw_items_in_proportion_to_their_weights():
    # 6 items of weight 4.5 and 54 of weight 0.5: half the weight each, so 30 draws each in an epoch of 60,
    # every heavy item exactly 5 times, a light one 0 or 1 time (5/9 on average).
    weights = [4.5] * 6 + [0.5] * 54
    s = _at(60, 10, seed=3, weights=weights, drop_last=False)
    assert len(s) == 6
    for epoch in range(20):
        drawn = [i for batch in _epoch(s, epoch) for i in batch]
        counts = Counter(drawn)
        assert len(drawn) == 60 and all(counts[i] == 5 for i in range(6))
        assert all(counts[i] <= 1 for i in range(6, 60))
    # Unequal, uneven weights (zeros among them): each item floor or ceil of its expected count in every
    # epoch, and that count on average over epochs.
    g = torch.Generator().manual_seed(0)
    w = torch.rand(40, generator=g, dtype=torch.float64) ** 3 * 10
    w[[3, 17]] = 0
    expected = 40 * w / w.sum()
    s = _at(40, 8, seed=1, weights=w.tolist())
    total = torch.zeros(40, dtype=torch.float64)
    epochs = 400
    for epoch in range(epochs):
        counts = torch.bincount(torch.tensor(_epoch(s, epoch)).flatten(), minlength=40).double()
        assert counts.sum() == 40 and ((counts - expected).abs() < 1 + 1e-9).all() and counts[[3, 17]].sum() == 0
        total += counts
    assert (total / epochs - expected).abs().max() < 0.12, (total / epochs - expected)


def test_weighted_epochs_resume_exactly_and_follow_the_seed():
    n, bs, w = 53, 4, [3.0] * 5 + [1.0] * 45 + [0.0] * 3
    s = _at(n, bs, seed=1, weights=w)
    run_ = [b for epoch in range(3) for b in _epoch(s, epoch)]      # the uninterrupted run, epoch by epoch
    per_epoch = len(s)
    assert per_epoch == n // bs
    for k in (0, 5, per_epoch, per_epoch + 3, 3 * per_epoch - 1):
        resumed = list(_at(n, bs, seed=1, step=k, weights=w))     # a fresh sampler, from the step alone
        assert resumed == run_[k:(k // per_epoch + 1) * per_epoch], k
    assert _epoch(_at(n, bs, seed=1, weights=w), 1) == _epoch(s, 1)
    assert _epoch(_at(n, bs, seed=2, weights=w), 1) != _epoch(s, 1)
    assert _epoch(s, 0) != _epoch(s, 1)


def test_ranks_share_each_epoch_without_overlap():
    n, bs, world = 50, 4, 3
    for weights in (None, [5.0] * 5 + [1.0] * 45):
        whole = _at(n, bs, seed=4, weights=weights).epoch_order(2)
        shards = [[i for b in _epoch(_at(n, bs, seed=4, world=world, rank=r, weights=weights), 2) for i in b]
                  for r in range(world)]
        share = n // world // bs * bs
        for r, shard in enumerate(shards):      # rank r: positions r, r + world, ... of the epoch's draws
            assert shard == whole[r::world][:share].tolist()
        if weights is None:                     # a permutation: no item on two ranks
            assert len(set().union(*map(set, shards))) == world * share
        else:                                   # the epoch's first world x share draws, repeats among them
            assert Counter(i for shard in shards for i in shard) == Counter(whole[:world * share].tolist())
            assert max(Counter(whole.tolist()).values()) > 1


def test_epoch_batches_weights_are_checked():
    for weights, match in (([1.0] * 4, "4 weights for 5 items"), ([1.0, -1, 1, 1, 1], ">= 0"),
                           ([0.0] * 5, "not all 0"), ([1.0, math.nan, 1, 1, 1], "finite")):
        with pytest.raises(ValueError, match=match):
            _at(5, 2, weights=weights)


def test_ema_with_warmup_follows_its_decay_rule():
    """AveragedModel with ema_with_warmup: each update lerps by 1 - min(decay, (1 + n) / (10 + n)), n the updates so
    far (float64 recurrence beside it); an integer buffer takes the current value."""
    from torch.optim.swa_utils import AveragedModel
    model = torch.nn.Linear(3, 2)
    model.register_buffer("count", torch.zeros((), dtype=torch.long))
    average = AveragedModel(model, multi_avg_fn=ema_with_warmup(0.95), use_buffers=True)
    torch.manual_seed(0)
    want = None
    for n in range(200):
        with torch.no_grad():
            model.weight.copy_(torch.randn(2, 3) + n / 10)
            model.count.fill_(n)
        average.update_parameters(model)
        w = model.weight.double()
        want = w.clone() if want is None else want + (w - want) * (1 - min(0.95, (1 + n) / (10 + n)))
    assert torch.allclose(average.module.weight.double(), want, rtol=1e-5, atol=1e-5)
    assert int(average.module.count) == 199
    # the warm-up: 20 updates on, the first weights' share is under 1e-4 (a fixed 0.95 would keep 0.95^19 = 38%)
    average = AveragedModel(model, multi_avg_fn=ema_with_warmup(0.95), use_buffers=True)
    for n in range(20):
        with torch.no_grad():
            model.weight.fill_(float(n == 0))
        average.update_parameters(model)
    assert 0 < average.module.weight.max() < 1e-4
