"""Selective copying (or induction) for every mixer at one parameter budget: a grid of `ssm_core.tasks` runs.

    python -m benchmarks.mixer_tasks --device cuda --workers 8 --out-dir $OUT          # the docs/mixers.md grid
    python -m benchmarks.mixer_tasks --device cpu --workers 2 --steps 300 --seq-len 32 --n-memorize 4
    python -m benchmarks.mixer_tasks --config configs/seeds/selective_copy_4096.yaml --out-dir runs/seeds/copy
    python -m benchmarks.mixer_tasks --config configs/seeds/induction.yaml --out-dir runs/seeds/induction

Each (mixer, lr, seed) is one `ssm_core.tasks.train` run in its own worker process (tiny models leave a GPU
mostly idle, so several share it) and its own run folder, <out-dir>/runs/<mixer>-lr<lr>-s<seed>. With
--time-limit every run stops after that many minutes of training with its checkpoint saved; the same command
again continues each unfinished run from its checkpoint and leaves finished ones as they are, so a grid
longer than one session of a machine is finished by repeating its command (with a larger --steps, finished
runs continue too, from their last checkpoints). d_model is chosen per mixer to
give about the same parameter count. Writes <out-dir>/mixer_tasks.json (every finished run's metrics, and
the unfinished runs' steps), mixer_tasks.png (accuracy per mixer, one dot per run) and prints a markdown
table: mean accuracy over the seeds of each mixer and learning rate. With --eval-lengths (induction) also
mixer_tasks_lengths.png: accuracy against test length, one line per mixer and evaluation mode.
"""
from __future__ import annotations

import json
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

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
    ("Attention", "attention", True, 96),
]

# Attention's cost grows with the square of the length: mixers with an attention layer are evaluated only up
# to this length (the Mamba paper's attention baselines fail beyond about twice the training length anyway).
ATTENTION_MAX_EVAL_LENGTH = 1 << 17


@dataclass
class GridConfig:
    task: Literal["selective-copy", "induction"] = "selective-copy"
    seq_len: int = 256
    n_memorize: int = 8
    n_tokens: int = 8
    steps: int = 4000
    batch_size: int = 64
    lrs: list[float] = field(default_factory=lambda: [3e-3, 1e-2])
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    seeds_for: dict[str, list[int]] = field(default_factory=dict, metadata={
        "help": "per mixer label, seeds instead of --seeds (e.g. three seeds for Mamba, one for the rest)"})
    mixers: list[str] = field(default_factory=lambda: [m[0] for m in MIXER_GRID if m[0] != "Attention"],
                              metadata={"help": "labels of MIXER_GRID to run"})
    n_layer: int = 2
    d_state: int = 16
    warmup_steps: int = field(default=0, metadata={"help": "0: a twentieth of --steps"})
    mixer_options: dict[str, dict[str, Any]] = field(default_factory=dict, metadata={
        "help": "MambaConfig.mixer_options of every model, e.g. '{mamba: {dt_min: 1e-5}}' (a mixer's keyword "
                "arguments)"})
    eval_examples: int = 1024
    eval_lengths: list[int] = field(default_factory=list, metadata={
        "help": "also evaluate every run at these lengths (see ssm_core.tasks)"})
    eval_mode: list[Literal["fused", "stream"]] = field(default_factory=lambda: ["fused"])
    eval_length_examples: int = 64
    # Streaming attention scores each chunk against every cached token (Attention.stream takes the chunk's
    # queries in blocks, so its memory stays bounded; its time still grows with the square of the length).
    stream_chunk: int = field(default=4096, metadata={"help": "tokens per chunk of --eval-mode stream"})
    init_from_grid: str | None = field(default=None, metadata={
        "help": "--out-dir of an earlier grid: each run starts from the weights of its run of the same name "
                "there (e.g. trained at a shorter --seq-len)"})
    time_limit: float | None = field(default=None, metadata={
        "help": "minutes of training per run in this command; run it again to continue the unfinished runs"})
    device: str = "auto"
    workers: int = 4
    out_dir: str = "runs/mixer_tasks"

    def __post_init__(self):
        known = [m[0] for m in MIXER_GRID]
        for m in [*self.mixers, *self.seeds_for]:
            if m not in known:
                raise ValueError(f"--mixers / --seeds-for: unknown label {m!r}; known: {', '.join(known)}")
        if self.workers < 1:
            raise ValueError(f"--workers: must be >= 1, got {self.workers}")
        if self.mixer_options:   # a wrong option name is one error now, not a failure of every run later
            from ssm_core import MambaConfig, MambaLM
            for label, spec, sel, d in MIXER_GRID:
                if label in self.mixers:
                    try:
                        MambaLM(MambaConfig(mixer=spec, selective=sel, d_model=d, n_layer=self.n_layer,
                                            d_state=self.d_state, vocab_size=4, mixer_options=self.mixer_options))
                    except (TypeError, ValueError) as exc:
                        raise ValueError(f"--mixer-options {self.mixer_options}: {label}: {exc}") from None
        if self.init_from_grid is not None and not (Path(self.init_from_grid) / "runs").is_dir():
            raise ValueError(f"--init-from-grid {self.init_from_grid}: not the --out-dir of a grid (no runs/ in it)")


def run_folder_name(label: str, lr: float, seed: int) -> str:
    slug = "".join(c if c.isalnum() else "-" for c in label.lower()).strip("-")
    while "--" in slug:
        slug = slug.replace("--", "-")
    return f"{slug}-lr{lr:g}-s{seed}"


def _run(kwargs: dict) -> dict:
    import torch
    torch.set_num_threads(1)
    from ssm_core import MambaConfig
    from ssm_core.tasks import FIRST_DATA, TaskConfig, train
    from ssm_core.training import OptimConfig
    model = MambaConfig(vocab_size=FIRST_DATA + kwargs["n_tokens"], **kwargs.pop("model"))
    optim = OptimConfig(lr=kwargs.pop("lr"), grad_clip=1.0, warmup_steps=kwargs.pop("warmup_steps"))
    out = Path(kwargs["output_dir"])
    done = out / "metrics.json"
    if kwargs["init_from"] is not None and not Path(kwargs["init_from"]).is_file():
        raise FileNotFoundError(f"--init-from-grid: {kwargs['init_from']} is missing (that run did not finish)")
    if done.is_file():   # finished in an earlier command
        metrics = json.loads(done.read_text())
        if metrics["step"] >= kwargs["steps"]:
            return metrics
        # Finished at fewer steps than --steps asks now: it continues from its last checkpoint (saved at its
        # last step), its schedule stretched to the new --steps from where it stands.
    resume = (out / "checkpoints" / "last.ckpt").is_file()
    metrics = train(TaskConfig(**kwargs, model=model, optim=optim, progress=False, resume=resume,
                               overwrite=not resume and out.exists()))
    if metrics["complete"]:
        write_json_atomic(done, metrics)
    return metrics


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


def length_table(results: list[dict]) -> dict[tuple[str, str], dict[int, float]]:
    """(mixer label, eval mode) -> {test length: accuracy averaged over the runs}."""
    acc: dict[tuple[str, str], dict[int, list[float]]] = {}
    for r in results:
        for row in r.get("extrapolation", []):
            acc.setdefault((r["label"], row["mode"]), {}).setdefault(row["length"], []).append(row["accuracy"])
    return {k: {n: sum(v) / len(v) for n, v in sorted(d.items())} for k, d in acc.items()}


def plot_lengths(table: dict, train_len: int, chance: float, title: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for (label, mode), row in table.items():
        ax.plot(list(row), list(row.values()), marker="o", ls="-" if mode == "fused" else "--",
                label=f"{label} ({mode})")
    ax.axvline(train_len, color="gray", lw=1, ls=":", label="training length")
    ax.axhline(chance, color="gray", lw=1, ls="--", label="chance")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("test sequence length")
    ax.set_ylabel("accuracy (mean over seeds)")
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    save_figure_atomic(fig, path)


def main(cfg: GridConfig) -> dict:
    grid = [m for m in MIXER_GRID if m[0] in cfg.mixers]
    out = Path(cfg.out_dir)
    jobs, labels = [], []
    for label, spec, sel, d in grid:
        lengths = cfg.eval_lengths if "attention" not in spec else [
            n for n in cfg.eval_lengths if n <= ATTENTION_MAX_EVAL_LENGTH]
        for lr in cfg.lrs:
            for seed in cfg.seeds_for.get(label, cfg.seeds):
                jobs.append(dict(task=cfg.task, model=dict(mixer=spec, selective=sel, d_model=d, n_layer=cfg.n_layer,
                                                           d_state=cfg.d_state, mixer_options=cfg.mixer_options),
                                 seq_len=cfg.seq_len, n_memorize=cfg.n_memorize, n_tokens=cfg.n_tokens,
                                 steps=cfg.steps, batch_size=cfg.batch_size, lr=lr, warmup_steps=cfg.warmup_steps,
                                 seed=seed, device=cfg.device, eval_examples=cfg.eval_examples,
                                 eval_lengths=lengths, eval_mode=cfg.eval_mode,
                                 eval_length_examples=cfg.eval_length_examples, stream_chunk=cfg.stream_chunk,
                                 time_limit=cfg.time_limit,
                                 init_from=None if cfg.init_from_grid is None else str(
                                     Path(cfg.init_from_grid) / "runs" / run_folder_name(label, lr, seed)
                                     / "checkpoints" / "last.ckpt"),
                                 output_dir=str(out / "runs" / run_folder_name(label, lr, seed))))
                labels.append(label)
    import contextlib
    import multiprocessing as mp
    results, unfinished, failed = [], [], []
    # One worker: the runs one after the other in this process (no process start-up).
    with (ProcessPoolExecutor(cfg.workers, mp_context=mp.get_context("spawn")) if cfg.workers > 1
          else contextlib.nullcontext()) as pool:
        futures = [pool.submit(_run, dict(j)) for j in jobs] if pool is not None else None
        for i, (label, job) in enumerate(zip(labels, jobs)):   # in order
            lr, seed = job["lr"], job["seed"]
            # One run's failure (CUDA out of memory, say) is reported with the others' results, not instead of
            # them: the grid still writes its JSON and tables, then exits with an error naming the failed runs.
            try:
                r = futures[i].result() if futures is not None else _run(dict(job))
            except Exception as exc:  # noqa: BLE001 (re-raised below, after the results are written)
                failed.append({"label": label, "lr": lr, "seed": seed, "error": f"{type(exc).__name__}: {exc}"})
                print(f"{label:22s} lr {lr:.0e} seed {seed}: failed: {type(exc).__name__}: {exc}", flush=True)
                continue
            if not r["complete"]:
                unfinished.append({"label": label, "lr": lr, "seed": seed, "step": r["step"]})
                print(f"{label:22s} lr {lr:.0e} seed {seed}: unfinished at step {r['step']} of {cfg.steps}",
                      flush=True)
                continue
            r["label"] = label
            results.append(r)
            print(f"{label:22s} lr {lr:.0e} seed {seed}: accuracy {r['accuracy']:.3f} "
                  f"(exact {r['exact_match']:.3f}) params {r['params']} {r['train_seconds']} s", flush=True)
    write_json_atomic(out / "mixer_tasks.json", {"grid": vars(cfg), "runs": results, "unfinished": unfinished,
                                                 "failed": failed})
    if unfinished:
        print(f"\n{len(unfinished)} of {len(jobs)} runs unfinished: run the same command again to continue them")
    if results:
        report_results(cfg, grid, results, out)
    if failed:
        f = failed[0]
        raise RuntimeError(f"{len(failed)} of {len(jobs)} runs failed (results of the others are in "
                           f"{out / 'mixer_tasks.json'}); first: {f['label']} lr {f['lr']:g} seed {f['seed']}: "
                           f"{f['error']}")
    return {"runs": results, "unfinished": unfinished}


def report_results(cfg: GridConfig, grid: list, results: list[dict], out: Path) -> None:
    """The markdown tables and the two PNGs of the finished runs."""
    print(f"\n{cfg.task}, {cfg.seq_len} positions, {cfg.n_memorize} tokens of {cfg.n_tokens}, {cfg.steps} steps "
          f"(chance {1 / cfg.n_tokens:.3f})\n")
    print("| mixer | params | lr | accuracy per seed | mean over seeds | best (exact match) |")
    print("|---|---|---|---|---|---|")
    for label, *_ in grid:
        for lr in cfg.lrs:
            rs = [r for r in results if r["label"] == label and r["config"]["optim"]["lr"] == lr]
            if not rs:
                continue
            best = max(rs, key=lambda r: r["accuracy"])
            mean = sum(r["accuracy"] for r in rs) / len(rs)
            per_seed = " / ".join(f"{r['accuracy']:.3f}" for r in rs)
            print(f"| {label} | {rs[0]['params']:,} | {lr:g} | {per_seed} | {mean:.3f} | "
                  f"{best['accuracy']:.3f} ({best['exact_match']:.3f}) |")
    chance = 1 / cfg.n_tokens
    plot_runs(results, [g[0] for g in grid], chance,
              f"{cfg.task}: {cfg.seq_len} positions, {cfg.n_memorize} tokens, {cfg.steps} steps", out / "mixer_tasks.png")
    table = length_table(results)
    if table:
        lengths = sorted({n for row in table.values() for n in row})
        print(f"\n{cfg.task} trained at {cfg.seq_len}: accuracy (mean over seeds) at each test length\n")
        print("| mixer (eval) | " + " | ".join(f"2^{n.bit_length() - 1}" if n & (n - 1) == 0 else str(n)
                                             for n in lengths) + " |")
        print("|---|" + "---|" * len(lengths))
        for (label, mode), row in table.items():
            print(f"| {label} ({mode}) | " + " | ".join(f"{row[n]:.3f}" if n in row else "–" for n in lengths) + " |")
        plot_lengths(table, cfg.seq_len, chance, f"{cfg.task}: trained at {cfg.seq_len}, tested at other lengths",
                     out / "mixer_tasks_lengths.png")


if __name__ == "__main__":
    main_entry(main, GridConfig, "python -m benchmarks.mixer_tasks")
