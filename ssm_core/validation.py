"""Checks of a run's options before any work starts: each bad value is one `UserError` naming its flag.

    validate_run(cfg)                      the common training fields (TrainConfig's), by name
    positive_finite(cfg.lr, "--lr")        and the other helpers, for a package's own fields

`validate_run` reads fields by name and skips the ones a config does not have, so it serves any config
that carries the common training fields, flat (`cfg.lr`) or nested one level (`cfg.optim.lr`, flag
`--optim.lr`). Nothing here starts a process, touches a GPU or writes outside a probe file that is removed
at once.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import tempfile
import typing
from pathlib import Path
from typing import Any

from .errors import UserError


@functools.lru_cache(maxsize=1)
def precisions() -> tuple[str, ...]:
    """Lightning's accepted precision values (its private `_PRECISION_INPUT`, read when first needed so
    that importing this module does not import Lightning); the literal list if that name moves."""
    try:
        from lightning.fabric.connector import _PRECISION_INPUT
    except ImportError:  # pragma: no cover (depends on the installed Lightning)
        return ("64", "32", "16", "bf16", "transformer-engine", "transformer-engine-float16", "16-true",
                "16-mixed", "bf16-true", "bf16-mixed", "32-true", "64-true")
    return tuple(str(v) for lit in typing.get_args(_PRECISION_INPUT) for v in typing.get_args(lit))


ACCELERATORS = ("auto", "cpu", "gpu", "cuda")
# Strategies that only run on CUDA GPUs (sharded training, DeepSpeed) or on TPUs.
CUDA_ONLY_STRATEGIES = ("fsdp", "deepspeed")
TPU_STRATEGIES = ("xla", "single_xla", "xla_debug", "single_tpu")
SEED_MAX = 2 ** 32 - 1   # numpy's seed range, which Lightning's seed_everything enforces by picking a random one


# --- single values ------------------------------------------------------------------------------------------
def _number(value: Any, flag: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            return float(value)
        except (TypeError, ValueError):
            raise UserError(f"{flag}: expected a number, got {value!r}") from None
    return float(value)


def finite(value: Any, flag: str) -> float:
    """`value` as a float; NaN and infinities refused."""
    v = _number(value, flag)
    if not math.isfinite(v):
        raise UserError(f"{flag}: must be a finite number, got {value}")
    return v


def positive_finite(value: Any, flag: str) -> float:
    """A learning rate, a scale, a duration: finite and > 0."""
    v = finite(value, flag)
    if v <= 0:
        raise UserError(f"{flag}: must be > 0, got {value}")
    return v


def at_least(value: Any, minimum: float, flag: str) -> Any:
    """Counts and intervals: `value >= minimum` (and finite)."""
    v = finite(value, flag)
    if v < minimum:
        raise UserError(f"{flag}: must be >= {minimum:g}, got {value}")
    return value


def in_range(value: Any, low: float, high: float, flag: str) -> float:
    """`low <= value <= high` (finite)."""
    v = finite(value, flag)
    if not low <= v <= high:
        raise UserError(f"{flag}: expected {low:g} to {high:g}, got {value}")
    return v


# --- paths --------------------------------------------------------------------------------------------------
def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when the two paths name one file: equal after resolving links and `..`, or hard links of it."""
    pa, pb = Path(a), Path(b)
    if pa.resolve() == pb.resolve():
        return True
    try:
        return os.path.samefile(pa, pb)
    except OSError:   # one of them does not exist (yet): then only the resolved names could match
        return False


def distinct_paths(inp: str | os.PathLike, out: str | os.PathLike, flags: tuple[str, str]) -> None:
    """Refuse an output that would overwrite an input: `flags` = (input flag, output flag)."""
    if same_file(inp, out):
        raise UserError(f"{flags[1]} {out}: is the input {flags[0]} {inp}; writing there would destroy it "
                        "(choose another output path)")


def _folder_to_be(p: Path, shown: Path, flag: str) -> Path:
    """The nearest existing folder at or above `p` (where `p` would be created); a file on the way is refused."""
    base = p.absolute()
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        raise UserError(f"{flag} {shown}: {base} is a file, not a folder")
    return base


def _probe_writable(folder: Path, flag: str, shown: Path) -> None:
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=folder)
    except OSError as e:
        raise UserError(f"{flag} {shown}: not writable ({e.strerror or e})") from None
    os.close(fd)
    os.unlink(probe)


def writable_folder(path: str | os.PathLike, flag: str) -> Path:
    """An output folder that is a folder (or can become one) where we can create files. Creates nothing."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UserError(f"{flag} {p}: exists and is not a folder")
    _probe_writable(_folder_to_be(p, p, flag), flag, p)
    return p


def output_file(path: str | os.PathLike, flag: str) -> Path:
    """A file we are about to write: not a folder, its folder writable (or creatable). Creates nothing."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{flag} {p}: is a folder; give a file name")
    _probe_writable(_folder_to_be(p.parent, p, flag), flag, p)
    return p


def cache_folder(path: str | os.PathLike | None, flag: str) -> Path | None:
    """A cache location: None (the default cache), or a folder / a path that can become one."""
    if path is None:
        return None
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UserError(f"{flag} {p}: exists and is not a folder (a cache must be a folder)")
    _folder_to_be(p, p, flag)
    return p


# --- hardware -----------------------------------------------------------------------------------------------
def cpu_count() -> int:
    """CPUs this process may run on (its affinity mask, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cuda_count() -> int:
    import torch
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_accelerator(accelerator: str, flag: str = "--accelerator") -> str:
    """'cpu' or 'gpu': the accelerator a run will use, refusing one that is not there."""
    acc = str(accelerator).strip().lower()
    if acc not in ACCELERATORS:
        raise UserError(f"{flag}: expected cpu, gpu or auto; got {accelerator!r}")
    if acc == "auto":
        return "gpu" if cuda_count() else "cpu"
    if acc in ("gpu", "cuda") and not cuda_count():
        raise UserError(f"{flag} {accelerator}: no CUDA GPU is available on this machine (use --accelerator cpu)")
    return "gpu" if acc == "cuda" else acc


def check_devices(devices: Any, accelerator: str, flag: str = "--devices") -> Any:
    """`devices` as Lightning takes it ('auto', a count, -1 for all, or GPU indices), refused when it asks
    for more than exist here: on the CPU each device is a training process, so `--devices 99` would start
    99 of them. `accelerator` is the resolved one ('cpu' or 'gpu')."""
    if isinstance(devices, (list, tuple)):
        value: Any = [int(_number(d, flag)) for d in devices]
    else:
        s = str(devices).strip().lower()
        if s == "auto":
            return "auto"
        try:
            value = int(s) if "," not in s else [int(x) for x in s.split(",") if x.strip()]
        except ValueError:
            raise UserError(f"{flag}: expected a number, a list like 0,1, or auto; got {devices!r}") from None
    if accelerator == "cpu":
        have = cpu_count()
        if isinstance(value, list):
            raise UserError(f"{flag} {devices}: on the CPU give a number of processes (1 to {have}), not a list")
        if value == -1:
            return have
        if not 1 <= value <= have:
            raise UserError(f"{flag} {devices}: this machine has {have} CPUs; give 1 to {have} "
                            "(each device is one training process)")
        return value
    have = cuda_count()
    if isinstance(value, list):
        if not value:
            raise UserError(f"{flag}: empty list of GPUs")
        bad = [i for i in value if not 0 <= i < have]
        if bad:
            raise UserError(f"{flag} {devices}: no GPU {bad[0]} here (this machine has GPUs 0 to {have - 1})")
        if len(set(value)) != len(value):
            raise UserError(f"{flag} {devices}: a GPU is listed twice")
        return value
    if value == -1:
        return -1
    if not 1 <= value <= have:
        raise UserError(f"{flag} {devices}: this machine has {have} GPU{'s' if have != 1 else ''}; "
                        f"give 1 to {have}, -1 for all, or auto")
    return value


def check_precision(precision: Any, accelerator: str, flag: str = "--precision") -> None:
    if precision is None:
        return
    p = str(precision).strip()
    if p not in precisions():
        shown = ", ".join(x for x in precisions() if "-" in x)
        raise UserError(f"{flag}: expected one of {shown}; got {precision!r}")
    if p.startswith("transformer-engine") and accelerator != "gpu":
        raise UserError(f"{flag} {precision}: needs a CUDA GPU (this run is on the CPU)")


def check_strategy(strategy: Any, accelerator: str, flag: str = "--strategy") -> None:
    s = str(strategy).strip().lower()
    if s == "auto":
        return
    from lightning.pytorch.strategies import StrategyRegistry
    known = StrategyRegistry.available_strategies()
    if s not in known:
        common = ", ".join(x for x in ("auto", "ddp", "ddp_spawn", "fsdp", "deepspeed") if x == "auto" or x in known)
        raise UserError(f"{flag}: unknown strategy {strategy!r} (common ones: {common})")
    if s.startswith(CUDA_ONLY_STRATEGIES) and accelerator != "gpu":
        raise UserError(f"{flag} {strategy}: needs CUDA GPUs (this run is on the CPU; use --strategy auto or ddp)")
    if s in TPU_STRATEGIES:
        raise UserError(f"{flag} {strategy}: needs TPUs, which this project does not support")


# --- a whole training config ---------------------------------------------------------------------------------
def _flag(prefix: str, name: str) -> str:
    return f"--{prefix}{name}" if prefix else f"--{name.replace('_', '-')}"


def _fields(obj: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    if hasattr(obj, "__dict__"):
        return {k: v for k, v in vars(obj).items() if not k.startswith("_")}
    if isinstance(obj, dict):
        return dict(obj)
    return {}


# Field-name rules applied to every field of a config (and one nesting level down): what each kind of
# option must satisfy whatever package declares it.
def _check_by_name(name: str, value: Any, flag: str) -> None:
    if value is None or isinstance(value, bool):
        return
    if name.endswith("cache") or name == "cache_dir":
        if isinstance(value, (str, os.PathLike)) and str(value):
            cache_folder(value, flag)
        return
    if isinstance(value, float):
        finite(value, flag)          # no option of ours means anything at NaN or infinity
    if name == "lr" or name.endswith("_lr") or name == "learning_rate":
        positive_finite(value, flag)
    elif name in ("weight_decay", "dropout", "gradient_clip_val", "grad_clip", "warmup_fraction"):
        at_least(value, 0, flag)
    elif name.endswith("num_workers"):
        at_least(value, 0, flag)
    elif (name.endswith(("_every", "_interval", "_every_n_steps", "_every_n_epochs")) or name.startswith("every_n_")
          or name in ("batch_size", "n_mels", "d_model", "n_layer", "d_state", "num_nodes")):
        if isinstance(value, int):
            at_least(value, 1, flag)
        elif isinstance(value, float):   # a fraction of an epoch, as Lightning's val_check_interval=0.25
            positive_finite(value, flag)


def validate_run(cfg: Any) -> dict[str, Any]:
    """Check a training config before anything starts; return the resolved {'accelerator', 'devices'}.

    Fields by name (absent ones skipped): output_dir (a writable folder), max_steps (-1 or >= 1),
    max_epochs (None or >= 1), batch_size/num_nodes (>= 1), accelerator (present here), devices (no more
    than exist), strategy (known, and for this accelerator), precision (Lightning's values), seed (numpy's
    range), num_workers (>= 0); learning rates (`lr`, `*_lr`) finite and > 0; intervals (`*_every`,
    `*_interval`, `every_n_*`) >= 1; caches (`*_cache`, `cache_dir`) folders; every float finite."""
    fields = _fields(cfg)
    for name, value in fields.items():
        nested = _fields(value) if dataclasses.is_dataclass(value) or type(value).__name__ == "Namespace" else {}
        if nested:
            for sub, v in nested.items():
                _check_by_name(sub, v, _flag(f"{name}.", sub))
        else:
            _check_by_name(name, value, _flag("", name))
    if "max_steps" in fields and fields["max_steps"] is not None:
        ms = fields["max_steps"]
        if ms != -1 and ms < 1:
            raise UserError(f"--max-steps: must be >= 1 (or -1 for no limit), got {ms}")
    if fields.get("max_epochs") is not None:
        at_least(fields["max_epochs"], 1, "--max-epochs")
    if fields.get("seed") is not None:
        seed = fields["seed"]
        if not 0 <= int(seed) <= SEED_MAX:
            raise UserError(f"--seed: expected 0 to {SEED_MAX}, got {seed}")
    acc = check_accelerator(fields["accelerator"]) if "accelerator" in fields else "cpu"
    devices = check_devices(fields["devices"], acc) if "devices" in fields else "auto"
    if "strategy" in fields and fields["strategy"] is not None:
        check_strategy(fields["strategy"], acc)
    if "precision" in fields:
        check_precision(fields["precision"], acc)
    if fields.get("output_dir"):
        writable_folder(fields["output_dir"], "--output-dir")
    return {"accelerator": acc, "devices": devices}
