"""Which output folders a run may write into, and what it may remove there.

    out = prepare_run_dir(cfg.output_dir, resume=cfg.resume, overwrite=cfg.overwrite,
                          owned=("checkpoints", "logs", "model", "metrics.json"), program="genomics.pretrain")

A run marks its folder with `.long-ssm-run` (JSON: the program and the entries it owns). Then:

* a new or empty folder becomes a run folder;
* a non-empty folder without the mark is refused (it is not ours, and nothing in it is touched), unless
  it holds only entries this run writes (a run from before the mark);
* a folder of an earlier run is continued only with --resume and replaced only with --overwrite; replacing
  removes only the entries the earlier run listed as its own (and this run's), never other files;
* files of atomic writes that a kill interrupted (`.<name>.<random>.tmp`, see ssm_core.io) are removed from
  a run folder at every start; elsewhere nothing is removed.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from .cli import UserError
from .io import TMP_NAME as STALE_TMP
from .io import write_json_atomic
from .validation import writable_folder

MARKER = ".long-ssm-run"


def is_run_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / MARKER).is_file()


def read_marker(path: str | os.PathLike) -> dict:
    try:
        data = json.loads((Path(path) / MARKER).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def remove_stale_tmp(path: str | os.PathLike) -> list[Path]:
    """Remove leftovers of interrupted atomic writes anywhere under a run folder; returns what was removed."""
    removed = []
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            if STALE_TMP.match(name):
                p = Path(dirpath) / name
                try:
                    p.unlink()
                except FileNotFoundError:
                    continue
                removed.append(p)
    return removed


def _contents(p: Path) -> list[str]:
    return sorted(e.name for e in p.iterdir() if e.name != MARKER and not STALE_TMP.match(e.name))


def _remove_owned(p: Path, owned: Iterable[str]) -> None:
    for name in owned:
        entry = p / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            continue   # a marker edited to point outside the folder: never follow it
        if entry.is_symlink() or entry.is_file():
            entry.unlink()
        elif entry.is_dir():
            shutil.rmtree(entry)


def prepare_run_dir(path: str | os.PathLike, *, resume: bool = False, overwrite: bool = False,
                    owned: Iterable[str] = (), program: str = "", flag: str = "--output-dir") -> Path:
    """Apply the policy above and return the folder, created and marked, ready for the run's outputs.

    `owned`: the entries this run writes (files or folders, relative paths: "model/config.json" owns that file
    and not the rest of model/); with --overwrite they, and those the earlier run listed, are removed before
    the run starts."""
    owned = list(owned)
    if resume and overwrite:
        raise UserError("--resume and --overwrite: give one of them (continue the earlier run, or replace it)")
    p = writable_folder(path, flag)
    existing = _contents(p) if p.is_dir() else []
    # A folder holding only what this run would write is one of ours too: a run made before the mark
    # existed, or one killed before writing it.
    ours = is_run_dir(p) or (bool(owned) and set(existing) <= {Path(o).parts[0] for o in owned})
    if existing and not ours:
        shown = ", ".join(existing[:3]) + (", ..." if len(existing) > 3 else "")
        raise UserError(f"{flag} {p}: the folder is not empty ({shown}) and is not a folder of an earlier run; "
                        "choose a new or empty folder")
    if existing and not (resume or overwrite):
        raise UserError(f"{flag} {p}: holds an earlier run; pass --resume to continue it or --overwrite to "
                        "replace it (or choose another folder)")
    if not existing and resume:
        raise UserError(f"{flag} {p}: --resume, but there is no earlier run here to continue")
    p.mkdir(parents=True, exist_ok=True)
    if ours:
        remove_stale_tmp(p)
    previous = read_marker(p)
    if existing and overwrite:
        _remove_owned(p, sorted(set(owned) | set(previous.get("owned", []))))
    if resume:
        owned = sorted(set(owned) | set(previous.get("owned", [])))
    write_json_atomic(p / MARKER, {"tool": "long-ssm", "program": program or previous.get("program", ""),
                                   "owned": owned})
    return p
