"""A CSV log that survives --resume.

Lightning's CSVLogger deletes `metrics.csv` whenever it starts in a folder that has one, so a run that was
killed and resumed keeps only the rows logged after the resume. `ResumableCSVLogger(..., resume=True)`
keeps the file instead; at the first save it drops the rows at or after the first step logged anew (the
interrupted run had logged them after its last checkpoint, and the resumed run logs them again), then
appends, so the file reads as one uninterrupted run. Without `resume` it behaves as CSVLogger.
"""
from __future__ import annotations

import csv

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

from .io import atomic_path


class _ContinuingWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        # Keep metrics.csv (the parent removes it); its columns become this writer's known keys, so rows
        # logged now are appended under the same header (or the file is rewritten once with new columns).
        self._pending_prune = self._fs.isfile(self.metrics_file_path)
        if self._pending_prune:
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = sorted(next(csv.reader(f), []))

    def save(self) -> None:
        if self._pending_prune and self.metrics:
            first = min(int(m["step"]) for m in self.metrics)
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                reader = csv.DictReader(f)
                fields = reader.fieldnames or []
                kept = [row for row in reader if row.get("step", "") != "" and int(float(row["step"])) < first]
            with atomic_path(self.metrics_file_path) as tmp, open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=fields)
                writer.writeheader()
                writer.writerows(kept)
            self._pending_prune = False
        super().save()


class ResumableCSVLogger(CSVLogger):
    """CSVLogger whose metrics.csv keeps the rows of the run being resumed (see the module docstring)."""

    def __init__(self, *args, resume: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.resume = resume

    def after_save_checkpoint(self, checkpoint_callback) -> None:
        # Rows are otherwise written every flush_logs_every_n_steps: a run killed after a checkpoint would
        # lose the rows before it, which its resume does not log again.
        self.save()

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None and self.resume:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuingWriter(log_dir=self.log_dir)
        return super().experiment
