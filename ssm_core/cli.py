"""Command lines generated from config dataclasses (jsonargparse), shared by every `python -m ...` entry point.

Each field of the dataclass is a flag; a field that is itself a dataclass is a group whose fields are
`--group.field` flags (`--model.d_state 16`, `--optim.lr 3e-3`), and a `--config FILE.yaml` key of the same
nesting (`model: {d_state: 16}`). Precedence: dataclass defaults < `--config` < flags. `--print_config`
prints the resolved configuration as YAML and exits.

Spelling: dashes and underscores in flag names are the same (`--output-dir` = `--output_dir`,
`--model.d-state` = `--model.d_state`); help and YAML use the field names. For the habits of the earlier
argparse CLIs, a boolean flag alone means true (`--resume`), `--no-FLAG` means false, and a list flag
takes several values (`--fasta a.fa b.fa`) as well as a YAML list (`--fasta '[a.fa, b.fa]'`). A flag
that names a field of a group without the group (`--d-model`, `--lr`: the flat flags of before) is an
error naming its new spelling.

Errors a user can fix (bad flags, bad files, bad data) print one line `prog: error: ...` and exit with
status 2; no traceback (`--debug` or SSM_DEBUG=1 shows one).

A config class may declare `DERIVED: dict[str, str]` (key -> what it follows from, e.g.
{"model.vocab_size": "--keep-softmask"}) with a classmethod `derive(values) -> {key: value}`: those fields
are filled in from the other options before the dataclasses are built, and are neither flags nor keys.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Callable, Literal, TypeVar

from .errors import UserError, report, strip_debug_flag  # UserError: importable from here, as before

T = TypeVar("T")


# --- the fields of a (nested) config dataclass ----------------------------------------------------------
def _unwrap_optional(tp):
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _is_dataclass_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def config_fields(cls: type, prefix: str = "") -> dict[str, tuple[Any, dataclasses.Field]]:
    """Every leaf option of a config dataclass: dotted key -> (type, field); groups recurse."""
    out: dict[str, tuple[Any, dataclasses.Field]] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = _unwrap_optional(hints[f.name])
        if _is_dataclass_type(tp):
            out.update(config_fields(tp, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = (hints[f.name], f)
    return out


def _groups(cls: type) -> set[str]:
    return {k.rsplit(".", 1)[0] for k in config_fields(cls) if "." in k}


def _type_name(tp) -> str:
    tp = _unwrap_optional(tp)
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(tp)))
    return getattr(tp, "__name__", None) if typing.get_origin(tp) is None else str(tp).replace("typing.", "")


def _is_list(tp) -> bool:
    tp = _unwrap_optional(tp)
    return typing.get_origin(tp) in (list, tuple)


def _is_bool(tp) -> bool:
    return _unwrap_optional(tp) is bool


# --- the parser -----------------------------------------------------------------------------------------
def build_parser(config_cls: type, prog: str | None = None, description: str | None = None):
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog=prog, description=description, exit_on_error=False, default_env=False,
                            epilog="Dashes and underscores in flag names are the same (--output-dir = "
                                   "--output_dir). --debug: show the traceback of an error.")
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file of option values (flags override it)")
    parser.add_class_arguments(config_cls, fail_untyped=True, sub_configs=False)
    fields = config_fields(config_cls)
    derived = getattr(config_cls, "DERIVED", {})
    for action in parser._actions:
        if action.dest == "print_config":     # parse_config prints the resolved config itself
            action.help = "print the resolved configuration (as a run's config.yaml) and exit"
        elif action.dest in derived:
            action.help = argparse.SUPPRESS
        elif action.dest in fields and fields[action.dest][1].metadata.get("help"):
            action.help = fields[action.dest][1].metadata["help"]
        elif action.dest in _groups(config_cls):
            action.help = argparse.SUPPRESS    # the group's own config-file flag: --config covers it
    return parser


def _flag_error(message: str) -> UserError:
    return UserError(f"{message} (see --help)")


def _moved(name: str, fields: dict) -> str | None:
    """The new key of an old flat flag: the one group field of that name."""
    hits = [k for k in fields if "." in k and k.rsplit(".", 1)[1] == name]
    return hits[0] if len(hits) == 1 else None


def normalize_argv(config_cls: type, argv: list[str]) -> list[str]:
    """The earlier argparse spellings in jsonargparse's: see the module docstring."""
    fields = config_fields(config_cls)
    groups = _groups(config_cls)
    derived = getattr(config_cls, "DERIVED", {})
    moved = getattr(config_cls, "MOVED_FLAGS", {})
    out: list[str] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        i += 1
        if not tok.startswith("--") or tok == "--":
            out.append(tok)
            continue
        name, eq, inline = tok[2:].partition("=")
        key = name.replace("-", "_")
        if key in ("help", "config"):
            out.append(f"--{key}{eq}{inline}")
            continue
        negated = False
        if key not in fields and key.startswith("no_") and _is_bool(fields.get(key[3:], (None,))[0]):
            key, negated = key[3:], True
        if key in moved:
            raise _flag_error(f"--{name}: moved to --{moved[key]}")
        if key in derived:
            raise _flag_error(f"--{name}: not an option here (it follows from {derived[key]})")
        if key not in fields:
            if key in groups:
                raise _flag_error(f"--{name}: give the group's fields, e.g. --{key}."
                                  f"{next(k for k in fields if k.startswith(key + '.')).split('.')[-1]} VALUE")
            new = _moved(key, fields)
            if new and new not in derived:
                raise _flag_error(f"--{name}: moved to --{new}")
            new = _moved(key[3:], fields) if key.startswith("no_") else None
            if new and _is_bool(fields[new][0]):
                raise _flag_error(f"--{name}: moved to --{new} false")
            raise _flag_error(f"unrecognized option --{name}")
        tp = fields[key][0]
        values: list[str] = [inline] if eq else []
        if not eq:
            while i < len(argv) and not (argv[i].startswith("--") and len(argv[i]) > 2):
                values.append(argv[i])
                i += 1
                if not _is_list(tp):
                    break
        if negated:
            if values:
                raise _flag_error(f"--{name}: takes no value")
            values = ["false"]
        elif _is_bool(tp) and not values:
            values = ["true"]
        elif not values:
            raise _flag_error(f"--{name}: expected a value")
        if _unwrap_optional(tp) is float and len(values) == 1:
            # YAML spells these .nan / .inf: a float flag given `nan` reaches the config's own check by name.
            values = [_YAML_FLOATS.get(values[0].strip().lower(), values[0])]
        if _is_list(tp) and not (len(values) == 1 and values[0].lstrip().startswith(("[", "null"))):
            values = [_yaml_list(values, tp)]
        out.append(f"--{key}={values[0]}")
        out.extend(values[1:])   # extra words after a single-valued flag: left for the parser to reject
    return out


_YAML_FLOATS = {"nan": ".nan", "inf": ".inf", "+inf": ".inf", "infinity": ".inf", "+infinity": ".inf",
                "-inf": "-.inf", "-infinity": "-.inf"}


def _yaml_list(values: list[str], tp) -> str:
    """Several command-line words as one YAML flow list; strings quoted so commas and colons stay text."""
    inner = typing.get_args(_unwrap_optional(tp))
    item = inner[0] if inner else str
    if item in (str, Path) or _unwrap_optional(item) in (str, Path):
        return json.dumps(values)
    return "[" + ", ".join(values) + "]"


def check_yaml(config_cls: type, path: str) -> None:
    """One clear line for a missing, unreadable or misnamed --config file (jsonargparse's are long)."""
    import yaml
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--config {path}: no such file")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"--config {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserError(f"--config {path}: expected a mapping of option: value")
    fields = config_fields(config_cls)
    derived = getattr(config_cls, "DERIVED", {})
    moved = getattr(config_cls, "MOVED_FLAGS", {})

    def walk(d: dict, prefix: str):
        for k, v in d.items():
            key = prefix + str(k).replace("-", "_")
            if key in moved and not isinstance(v, dict):
                raise UserError(f"--config {path}: {key!r} moved to {moved[key]!r}")
            if key in derived:
                raise UserError(f"--config {path}: {key!r} is not an option (it follows from {derived[key]})")
            if key in fields:
                continue
            if isinstance(v, dict) and any(f.startswith(key + ".") for f in fields):
                walk(v, key + ".")
                continue
            new = _moved(key, fields) if "." not in key else None
            hint = f" (moved to {new!r}, nested: {new.split('.')[0]}: {{{new.split('.')[1]}: ...}})" if new else ""
            raise UserError(f"--config {path}: unknown option {key!r}{hint}")
    walk(data, "")


def _one_line(err: Exception, fields: dict) -> str:
    """jsonargparse's (multi-line) parse errors as one line naming the flag."""
    msg = str(err)
    m = re.search(r'Parser key "([^"]+)"', msg)
    if m:
        key = m.group(1)
        got = re.search(r"(?:Got value|Given value): (.*)", msg)
        value = got.group(1).strip() if got else None
        tp = fields.get(key, (None,))[0]
        shown = value.strip("'\"") if value is not None else None
        if shown is not None and shown.lstrip("+-").lower() in ("nan", "inf", "infinity"):
            # jsonargparse refuses non-finite floats as "invalid": say why, in ssm_core.validation's words.
            flag = key if "." in key else key.replace("_", "-")
            return f"--{flag}: must be a finite number, got {shown}"
        if tp is not None and typing.get_origin(_unwrap_optional(tp)) is Literal:
            choices = ", ".join(map(str, typing.get_args(_unwrap_optional(tp))))
            return f"--{key}: invalid choice {value!r} (choose from {choices})"
        expected = f"expected {_type_name(tp)}" if tp is not None else msg.splitlines()[-1].strip()
        return f"--{key}: invalid value {value!r} ({expected})"
    m = re.search(r"unrecognized arguments: (.*)", msg)
    if m:
        return f"unexpected argument(s): {m.group(1).strip()}"
    return " ".join(line.strip() for line in msg.splitlines() if line.strip())


def _values(ns) -> dict:
    """A jsonargparse Namespace as nested plain dicts."""
    return {k: _values(v) if hasattr(v, "as_dict") else v for k, v in vars(ns).items()}


def _set(d: dict, key: str, value) -> None:
    *parents, leaf = key.split(".")
    for p in parents:
        d = d.setdefault(p, {})
    d[leaf] = value


def instantiate(config_cls: type[T], values: dict) -> T:
    """Nested dicts -> the config dataclass (groups built bottom-up, DERIVED fields filled in first)."""
    values = json.loads(json.dumps(values, default=list))   # a private copy (tuples become lists)
    if hasattr(config_cls, "derive"):
        for key, value in config_cls.derive(values).items():
            _set(values, key, value)
    hints = typing.get_type_hints(config_cls)
    kwargs = {}
    for f in dataclasses.fields(config_cls):
        if f.name not in values:
            continue
        tp, v = _unwrap_optional(hints[f.name]), values[f.name]
        if _is_dataclass_type(tp) and isinstance(v, dict):
            try:
                v = instantiate(tp, v)
            except ValueError as e:   # the group's own messages ("MambaConfig.mixer: ...") in flag terms
                msg = str(e).splitlines()[0].replace(f"{tp.__name__}.", f"--{f.name}.")
                # "features: --n-mels: ..." (a group naming its field as a flat flag): --features.n_mels
                m = re.match(rf"(?:{f.name}: )?--([\w-]+)(.*)", msg)
                if m and m.group(1).replace("-", "_") in {g.name for g in dataclasses.fields(tp)}:
                    msg = f"--{f.name}.{m.group(1).replace('-', '_')}{m.group(2)}"
                raise ValueError(msg if msg.startswith("--") else f"--{f.name}: {msg}") from None
        elif typing.get_origin(_unwrap_optional(tp)) is tuple and isinstance(v, list):
            v = tuple(v)
        kwargs[f.name] = v
    return config_cls(**kwargs)


def parse_config(config_cls: type[T], argv: list[str] | None = None, prog: str | None = None,
                 description: str | None = None) -> T:
    """The config of a command line. `--print_config` prints it resolved (as a run's config.yaml) and exits."""
    argv = list(sys.argv[1:] if argv is None else argv)
    is_print = lambda a: a.split("=", 1)[0].replace("-", "_") == "__print_config"
    print_config = any(map(is_print, argv))
    argv = [a for a in argv if not is_print(a)]
    for i, tok in enumerate(argv):
        if tok.replace("-", "_") == "__config" and i + 1 < len(argv):
            check_yaml(config_cls, argv[i + 1])
        elif tok.startswith("--config="):
            check_yaml(config_cls, tok.split("=", 1)[1])
    parser = build_parser(config_cls, prog, description)
    fields = config_fields(config_cls)
    try:
        ns = parser.parse_args(normalize_argv(config_cls, argv))
    except argparse.ArgumentError as e:
        raise _flag_error(_one_line(e, fields)) from None
    values = _values(ns)
    values.pop("config", None)
    values.pop("__path__", None)
    try:
        cfg = instantiate(config_cls, values)
    except (ValueError, TypeError) as e:
        raise UserError(str(e).splitlines()[0]) from None
    if print_config:
        print(dump_config(cfg), end="")
        sys.exit(0)
    return cfg


def config_dict(cfg) -> dict:
    """A config as nested plain data, DERIVED fields left out: what `--config` reads back."""
    d = json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
    for key in getattr(type(cfg), "DERIVED", {}):
        *parents, leaf = key.split(".")
        node = d
        for p in parents:
            node = node.get(p, {})
        node.pop(leaf, None)
    return d


def dump_config(cfg) -> str:
    import yaml
    return yaml.safe_dump(config_dict(cfg), sort_keys=False)


def load_yaml_config(config_cls: type[T], path: str, argv: list[str] = ()) -> T:
    """The config a YAML file (plus optional flags) gives, checked as on the command line."""
    return parse_config(config_cls, ["--config", str(path), *argv])


def run(main: Callable[[T], Any], config_cls: type[T], argv: list[str] | None = None, prog: str | None = None,
        description: str | None = None) -> int:
    """Parse the command line into `config_cls`, check the run's options (ssm_core.validation) before any work,
    call `main(config)`; every exception becomes one line and an exit status (ssm_core.errors.report)."""
    from .validation import validate_run
    prog = prog or os.path.basename(sys.argv[0])
    argv, debug = strip_debug_flag(sys.argv[1:] if argv is None else argv)
    try:
        cfg = parse_config(config_cls, argv, prog, description)
        validate_run(cfg)
        main(cfg)
        return 0
    except BaseException as exc:  # noqa: BLE001 (the last line of defence: report decides what is shown)
        return report(exc, prog, debug or None)


def plain_warnings() -> None:
    """Command-line warnings as one line `warning: ...`, without the library's file and line."""
    import warnings
    warnings.formatwarning = lambda msg, *_a, **_k: f"warning: {msg}\n"


def main_entry(main: Callable[[T], Any], config_cls: type[T], prog: str, description: str | None = None) -> None:
    """`if __name__ == "__main__": main_entry(main, Config, "python -m pkg.mod")`."""
    sys.exit(run(main, config_cls, prog=prog, description=description))
