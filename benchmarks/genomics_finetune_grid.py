"""Fine-tuning recipes against the k-mer baseline, over seeds: `genomics.finetune` for each task x recipe x seed.

    python benchmarks/genomics_finetune_grid.py --checkpoint runs/genomics --out grid.json
    python benchmarks/genomics_finetune_grid.py --checkpoint runs/genomics --tasks species --seeds 0 1 2 \\
        --recipes "ft=" "lp-ft=--probe-init" "frozen=--freeze-backbone" \\
        --extra="--max-epochs 30" --workdir runs/ft_grid --out grid.json

Each run is `genomics.finetune --checkpoint C --task T --seed S <extra> <recipe flags>` (the CLI's own code,
in this process) with its output folder under --workdir/<recipe>/<task>/seed<S>; a run whose folder already
has finetune.json is read, not repeated, so a killed grid continues where it stopped. The seed draws the
demo task's sequences, the splits and the initialisation; the k-mer baseline is fitted on the same split
by every run. Writes --out (JSON, after every run: each run, and per task x recipe the mean and standard
deviation over seeds of the fine-tuned and baseline test accuracy and MCC and of the margin) and prints a
markdown table.
"""
from __future__ import annotations

import json
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from genomics.finetune import FinetuneConfig  # noqa: E402
from genomics.finetune import main as finetune_main  # noqa: E402
from ssm_core.cli import main_entry, parse_config  # noqa: E402
from ssm_core.io import write_json_atomic  # noqa: E402


@dataclass
class GridConfig:
    checkpoint: str = field(default="runs/genomics", metadata={"help": "genomics.pretrain output or a model folder"})
    tasks: list[str] = field(default_factory=lambda: ["motif", "species"])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    recipes: list[str] = field(default_factory=lambda: ["ft=--no-probe-init", "lp-ft=--probe-init"], metadata={
        "help": "NAME=FLAGS: genomics.finetune flags of each recipe (empty: the defaults)"})
    extra: str = field(default="", metadata={"help": "flags given to every run (spell it --extra=\"--flag value\")"})
    workdir: str = "runs/ft_grid"
    out: str | None = None

    def __post_init__(self):
        if any("=" not in r for r in self.recipes):
            raise ValueError("--recipes: give NAME=FLAGS (FLAGS may be empty)")
        if set(self.tasks) - {"motif", "species"}:
            raise ValueError("--tasks: motif and/or species")


def summarise(runs: list[dict]) -> list[dict]:
    """Mean and standard deviation over seeds per task x recipe."""
    rows = []
    for key in sorted(dict.fromkeys((r["task"], r["recipe"]) for r in runs)):
        sel = [r for r in runs if (r["task"], r["recipe"]) == key]
        row = {"task": key[0], "recipe": key[1], "seeds": [r["seed"] for r in sel]}
        for name in ("finetuned_accuracy", "baseline_accuracy", "margin_accuracy", "finetuned_mcc", "baseline_mcc",
                     "epochs", "seconds"):
            v = np.array([r[name] for r in sel], dtype=float)
            row[name] = {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0}
        rows.append(row)
    return rows


def main(cfg: GridConfig) -> dict:
    result = {"checkpoint": cfg.checkpoint, "extra": cfg.extra, "command": " ".join(sys.argv), "runs": []}
    # Recipes innermost: a grid cut short still compares them on the same tasks and seeds.
    for task in cfg.tasks:
        for seed in cfg.seeds:
            for recipe in cfg.recipes:
                name, flags = recipe.split("=", 1)
                folder = Path(cfg.workdir) / name / task / f"seed{seed}"
                t0 = time.perf_counter()
                if (folder / "finetune.json").is_file():
                    res = json.loads((folder / "finetune.json").read_text())
                else:
                    argv = ["--checkpoint", cfg.checkpoint, "--task", task, "--seed", str(seed),
                            "--output-dir", str(folder), *shlex.split(cfg.extra), *shlex.split(flags)]
                    res = finetune_main(parse_config(FinetuneConfig, argv))
                run = {"recipe": name, "flags": flags, "task": task, "seed": seed,
                       "finetuned_accuracy": res["finetuned"]["accuracy"], "finetuned_mcc": res["finetuned"]["mcc"],
                       "finetuned_auroc": res["finetuned"]["auroc"], "baseline_k": res["baseline"]["k"],
                       "baseline_accuracy": res["baseline"]["test"]["accuracy"],
                       "baseline_mcc": res["baseline"]["test"]["mcc"],
                       "margin_accuracy": res["margin_over_baseline"]["accuracy"], "epochs": res["epochs_run"],
                       "n_test": res["n"]["test"], "seconds": time.perf_counter() - t0}
                result["runs"].append(run)
                result["summary"] = summarise(result["runs"])
                if cfg.out:     # after every run: a grid cut short keeps what it measured
                    write_json_atomic(cfg.out, result)
    print("| task | recipe | seeds | fine-tuned acc. | k-mer baseline acc. | margin | fine-tuned MCC | epochs |")
    print("|---|---|---|---|---|---|---|---|")
    for r in result["summary"]:
        f = lambda k: f"{r[k]['mean']:.3f} ± {r[k]['sd']:.3f}"     # noqa: E731
        print(f"| {r['task']} | {r['recipe']} | {len(r['seeds'])} | {f('finetuned_accuracy')} | "
              f"{f('baseline_accuracy')} | {r['margin_accuracy']['mean']:+.3f} | {f('finetuned_mcc')} | "
              f"{r['epochs']['mean']:.1f} |")
    return result


if __name__ == "__main__":
    main_entry(main, GridConfig, "python benchmarks/genomics_finetune_grid.py", description=__doc__.split("\n\n")[0])
