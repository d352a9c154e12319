"""The weights' moving average against the raw weights of one `audio.train --ema-decay` run, on the run's test
voices and each held-out engine: a paired comparison (one training trajectory, two sets of weights), so the
seeds' spread does not blur it.

    python benchmarks/audio_ema_pair.py --run runs/kws --heldout '[.heldout/flite]' --out pair.json

Both come from the run's last checkpoint (`state_dict` is the average, `current_model_state` the raw weights,
as Lightning's WeightAveraging writes them), so they are the same step's; the exported model is the
average at the best validation, which may be an earlier step.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from audio.data import ClipDataset, build_splits, resolve_root
from audio.evaluate import evaluate_items
from audio.model import checkpoint_model, read_checkpoint
from audio.train import AudioTrainConfig, dataset_root, heldout_name
from ssm_core.cli import UserError, main_entry, parse_config
from ssm_core.io import write_json_atomic


@dataclass
class PairConfig:
    run: str = field(metadata={"help": "output folder of an audio.train run made with --ema-decay"})
    heldout: list[str] = field(default_factory=list, metadata={"help": "held-out engines' folders"})
    threads: int = 2
    out: str | None = field(default=None, metadata={"help": "write the table as JSON here"})


def main(cfg: PairConfig) -> dict:
    torch.set_num_threads(cfg.threads)
    run = Path(cfg.run)
    ckpt_file = run / "checkpoints" / "last.ckpt"
    if not ckpt_file.is_file():
        raise UserError(f"--run {run}: no checkpoints/last.ckpt")
    ckpt = read_checkpoint(ckpt_file, f"--run {ckpt_file}")
    if "current_model_state" not in ckpt:
        raise UserError(f"--run {run}: not trained with --ema-decay (its checkpoint holds one set of weights)")
    models = {name: checkpoint_model(ckpt, f"--run {ckpt_file}", weights)
              for name, weights in (("average", "state_dict"), ("raw", "current_model_state"))}
    train_cfg = parse_config(AudioTrainConfig, ["--config", str(run / "config.yaml")])
    labels, sr = models["raw"].labels, models["raw"].config.features.sample_rate
    sets = {"espeak (held-out voices)": build_splits(dataset_root(train_cfg), labels, seed=train_cfg.seed)["testing"]}
    for h in cfg.heldout:
        root = resolve_root(h, "--heldout")
        sets[heldout_name(root)] = build_splits(root, labels, seed=train_cfg.seed, flag="--heldout")["testing"]
    rows = {name: {w: evaluate_items(m, ClipDataset(items, sr), desc=f"{w} on {name}")["accuracy"]
                   for w, m in models.items()} for name, items in sets.items()}
    print(f"step {ckpt['global_step']} of {run} (--ema-decay {train_cfg.ema_decay})")
    print("| set | average | raw | average - raw |\n|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['average']:.3f} | {r['raw']:.3f} | {r['average'] - r['raw']:+.3f} |")
    result = {"run": str(run), "step": ckpt["global_step"], "ema_decay": train_cfg.ema_decay, "accuracy": rows}
    if cfg.out:
        write_json_atomic(cfg.out, {"config": cfg.__dict__, **result})
    return result


if __name__ == "__main__":
    main_entry(main, PairConfig, "python benchmarks/audio_ema_pair.py")
