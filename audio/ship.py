"""Turn a training run into the model that ships in the package: its weights and config, the detector's
operating point from a streaming evaluation, and a model card written from the run's own metrics.

    python -m audio.ship --run runs/kws --stream-eval runs/kws/stream/stream_eval.json          # -> audio/pretrained/kws

Writes config.json, model.safetensors, detector.json, MODEL_CARD.md and training_config.yaml (the run's
resolved configuration) into a temporary folder beside
--output and renames it into place; an existing --output is replaced only with --overwrite and only when it
holds nothing but those files (a folder of someone else's files is refused).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ssm_core.cli import UserError, main_entry
from ssm_core.io import atomic_folder, write_json_atomic, write_text_atomic
from ssm_core.validation import writable_folder

from .engines import ENGINE_NOTES
from .model import DETECTOR_FILE, SHIPPED_MODEL, export_model, load_model
from .train import AUGMENT_FIELDS

SHIPPED_FILES = {"config.json", "model.safetensors", DETECTOR_FILE, "MODEL_CARD.md", "training_config.yaml"}


@dataclass
class ShipConfig:
    run: str = field(default="", metadata={"help": "output folder of audio.train (holds model/, metrics.json)"})
    stream_eval: str | None = field(default=None, metadata={
        "help": "stream_eval.json of audio.stream_eval: its operating point becomes the default threshold"})
    output: str = field(default=str(SHIPPED_MODEL), metadata={"help": "folder to write"})
    overwrite: bool = False

    def __post_init__(self):
        if not self.run:
            raise ValueError("--run: required (an output folder of audio.train)")


def _read_json(path: Path, flag: str) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{flag} {path}: cannot read ({getattr(e, 'strerror', None) or e})") from None


def model_card(metrics: dict, run_config: dict, stream: dict | None, parameters: int) -> str:
    aug = {k: run_config.get(k) for k in AUGMENT_FIELDS}
    engines = metrics.get("accuracy_by_engine", {})
    rows = "\n".join(f"| {name} | {acc:.3f} |" for name, acc in engines.items()) or "| (none reported) | |"
    lines = [
        "# Keyword spotter shipped with long-ssm",
        "",
        f"Causal Mamba over log-mel frames, {parameters:,} parameters, classes: {', '.join(metrics['labels'])}.",
        "Used by `python -m audio.stream --wav FILE` / `--mic` when `--model` is not given.",
        "",
        "**It never heard a human recording.** Training speech is synthetic only: "
        + "; ".join(ENGINE_NOTES.get(e, e) for e in run_config.get("synth_engines") or ["espeak"])
        + "; one-second clips with noise, rooms and channels simulated.",
        "",
        f"Training: {metrics.get('steps')} steps, batch {run_config.get('batch_size')}, seed "
        f"{run_config.get('seed')}; `python -m audio.train --config training_config.yaml --output-dir runs/kws` "
        "(the run's resolved configuration, beside this card; `--heldout '[]'` without its held-out sets) "
        + ("repeats it (to the bit on the same GPU model and software: it ran with `--deterministic`, and every "
           "engine's words are seeded)."
           if run_config.get("deterministic") else
           "repeats its recipe; it ran without `--deterministic`, so a re-run on a GPU lands within about a "
           "seed's spread of these figures, not on them."),
        f"Augmentation: {json.dumps(aug)}.",
        "",
        "| test speech (12 classes, clip accuracy) | accuracy |",
        "|---|---|",
        rows,
        "",
    ]
    if stream:
        op = stream["operating_point"]
        lines += [f"Streaming ({stream['hours']:.2f} h of {Path(stream['heldout']).name} keywords among other "
                  f"words, silence and noise; {stream['keywords_spoken']} keywords): at threshold "
                  f"{op['threshold']:g} (smoothing {stream['smooth_ms']:g} ms, refractory "
                  f"{stream['refractory_ms']:g} ms) miss rate {op['miss_rate']:.3f} at "
                  f"{op['false_alarms_per_hour']:.2f} false alarms per hour. These are the defaults of "
                  "`audio.stream` with this model (detector.json).", ""]
    lines += ["Latency: see docs/BENCHMARKS.md, \"Audio streaming\" (1 CPU thread, 20 ms chunks).", ""]
    return "\n".join(lines)


def ship(cfg: ShipConfig) -> Path:
    run = Path(cfg.run)
    metrics = _read_json(run / "metrics.json", "--run")
    run_config = yaml.safe_load((run / "config.yaml").read_text()) if (run / "config.yaml").is_file() else {}
    model = load_model(run / "model")
    stream = _read_json(Path(cfg.stream_eval), "--stream-eval") if cfg.stream_eval else None
    out = writable_folder(cfg.output, "--output")
    if out.exists() and any(out.iterdir()):
        foreign = sorted(p.name for p in out.iterdir() if p.name not in SHIPPED_FILES)
        if foreign:
            raise UserError(f"--output {out}: holds files that are not a shipped model's ({', '.join(foreign)})")
        if not cfg.overwrite:
            raise UserError(f"--output {out}: holds a shipped model already; --overwrite replaces it")
    # An existing `out` holds only a shipped model's files (checked above).
    with atomic_folder(out) as tmp:
        export_model(model, tmp)
        if (run / "config.yaml").is_file():
            shutil.copyfile(run / "config.yaml", tmp / "training_config.yaml")
        if stream:
            write_json_atomic(tmp / DETECTOR_FILE, {
                "threshold": stream["operating_point"]["threshold"], "smooth_ms": stream["smooth_ms"],
                "refractory_ms": stream["refractory_ms"]})
        write_text_atomic(tmp / "MODEL_CARD.md", model_card(metrics, run_config, stream, model.num_parameters()))
    return out


def main(cfg: ShipConfig) -> Path:
    out = ship(cfg)
    print(f"audio.ship: wrote {', '.join(sorted(p.name for p in out.iterdir()))} to {out}")
    return out


if __name__ == "__main__":
    main_entry(main, ShipConfig, "python -m audio.ship")
