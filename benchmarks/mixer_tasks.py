"""Selective copying (or induction) for every mixer at one parameter budget: a grid of `ssm_core.tasks` runs.

    python -m benchmarks.mixer_tasks --device cuda --workers 8 --out-dir $OUT          # the docs/mixers.md grid
    python -m benchmarks.mixer_tasks --device cpu --workers 2 --steps 300 --seq-len 32 --n-memorize 4

Each (mixer, lr, seed) is one `ssm_core.tasks.train` run in its own worker process (tiny models leave a GPU
mostly idle, so several share it). d_model is chosen per mixer to give about the same parameter count.
Writes <out-dir>/mixer_tasks.json (every run's metrics), mixer_tasks.png (accuracy per mixer, one dot per
run) and prints a markdown table: best and mean accuracy over the runs of each mixer.
"""
from __future__ import annotations

import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ssm_core.cli import main_entry
from ssm_core.io import save_figure_atomic, write_json_atomic

# (label, mixer spec, selective, d_model): 69-74k parameters each at vocab 10 and 2 layers.
MIXER_GRID = [
    ("Mamba", "mamba", True, 68),
    ("Mamba-2", "mamba2", True, 72),
    ("Mamba + attention", "mamba,attention", True, 78),
    ("Mamba-2 + attention", "mamba2,attention", True, 80),
    ("S4D", "s4d", True, 124),
    ("Mamba, LTI ablation", "mamba", False, 72),
]


@dataclass
class GridConfig:
    task: str = "selective-copy"
    seq_len: int = 256
    n_memorize: int = 8
    n_tokens: int = 8
    steps: int = 4000
    batch_size: int = 64
    lrs: list[float] = field(default_factory=lambda: [3e-3, 1e-2])
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    mixers: list[str] = field(default_factory=lambda: [m[0] for m in MIXER_GRID],
                              metadata={"help": "labels of MIXER_GRID to run"})
    device: str = "auto"
    workers: int = 4
    out_dir: str = "runs/mixer_tasks"


def _run(kwargs: dict) -> dict:
    import torch
    torch.set_num_threads(1)
    from ssm_core import MambaConfig
    from ssm_core.tasks import FIRST_DATA, TaskConfig, train
    from ssm_core.training import OptimConfig
    # n_layer 2 as in the paper's synthetic tasks (MambaConfig's own default is 4: twice the parameters
    # this grid was sized for).
    model = MambaConfig(vocab_size=FIRST_DATA + kwargs["n_tokens"], n_layer=2, **kwargs.pop("model"))
    optim = OptimConfig(lr=kwargs.pop("lr"), grad_clip=1.0)
    return train(TaskConfig(**kwargs, model=model, optim=optim, progress=False))


def plot_runs(results: list[dict], labels: list[str], chance: float, title: str, path: Path) -> None:
    """One column per mixer, one dot per run."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for i, label in enumerate(labels):
        acc = [r["accuracy"] for r in results if r["label"] == label]
        ax.scatter([i] * len(acc), acc, alpha=0.7)
    ax.axhline(chance, color="gray", ls="--", lw=1, label="chance")
    ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right")
    ax.set_ylabel("answer accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.legend(loc="center left")
    fig.tight_layout()
    save_figure_atomic(fig, path)


def main(cfg: GridConfig) -> dict:
    grid = [m for m in MIXER_GRID if m[0] in cfg.mixers]
    jobs = [dict(task=cfg.task, model=dict(mixer=spec, selective=sel, d_model=d), seq_len=cfg.seq_len,
                 n_memorize=cfg.n_memorize, n_tokens=cfg.n_tokens, steps=cfg.steps, batch_size=cfg.batch_size,
                 lr=lr, seed=seed, device=cfg.device)
            for _, spec, sel, d in grid for lr in cfg.lrs for seed in cfg.seeds]
    labels = [label for label, *_ in grid for _ in cfg.lrs for _ in cfg.seeds]
    import multiprocessing as mp
    with ProcessPoolExecutor(cfg.workers, mp_context=mp.get_context("spawn")) as pool:
        results = []
        for label, r in zip(labels, pool.map(_run, jobs)):    # in order, as they finish
            r["label"] = label
            results.append(r)
            c = r["config"]
            print(f"{label:22s} lr {c['optim']['lr']:.0e} seed {c['seed']}: accuracy {r['accuracy']:.3f} "
                  f"(exact {r['exact_match']:.3f}) params {r['params']} {r['train_seconds']} s", flush=True)
    out = Path(cfg.out_dir)
    write_json_atomic(out / "mixer_tasks.json", {"grid": vars(cfg), "runs": results})

    print(f"\n{cfg.task}, {cfg.seq_len} positions, {cfg.n_memorize} tokens of {cfg.n_tokens}, {cfg.steps} steps "
          f"(chance {1 / cfg.n_tokens:.3f})\n")
    print("| mixer | params | best accuracy (exact) | mean accuracy over runs |")
    print("|---|---|---|---|")
    for label, *_ in grid:
        rs = [r for r in results if r["label"] == label]
        best = max(rs, key=lambda r: r["accuracy"])
        mean = sum(r["accuracy"] for r in rs) / len(rs)
        print(f"| {label} | {rs[0]['params']:,} | {best['accuracy']:.3f} ({best['exact_match']:.3f}) | {mean:.3f} |")

    plot_runs(results, [g[0] for g in grid], 1 / cfg.n_tokens,
              f"{cfg.task}: {cfg.seq_len} positions, {cfg.n_memorize} tokens, {cfg.steps} steps", out / "mixer_tasks.png")
    return {"runs": results}


if __name__ == "__main__":
    main_entry(main, GridConfig, "python -m benchmarks.mixer_tasks")
