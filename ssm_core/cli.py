"""Command lines generated from config dataclasses, shared by every `python -m ...` entry point.

Each field of the dataclass becomes a `--kebab-case` flag (bools get `--flag/--no-flag`, lists take
several values, `Literal` types become choices, a field's `metadata={"help": ...}` is its help). `--config
FILE.yaml` supplies values too: dataclass defaults < YAML < flags. Errors a user can fix (bad flags, bad
files, bad data) print one line `prog: error: ...` and exit with status 2; no traceback (set SSM_DEBUG=1
to see one).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any, Callable, Literal, TypeVar

T = TypeVar("T")


class UserError(Exception):
    """A problem with the user's input (file, flag, data). Printed as one line; exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def _unwrap_optional(tp):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
        return args, True
    return tp, False


def _converter(tp, flag: str):
    """A function str -> value for a (non-list) field type."""
    if isinstance(tp, list):  # a union such as int | str: try in order
        convs = [_converter(t, flag) for t in tp]

        def conv(s):
            for c in convs:
                try:
                    return c(s)
                except (ValueError, argparse.ArgumentTypeError):
                    pass
            raise argparse.ArgumentTypeError(f"invalid value {s!r}")
        return conv
    if tp is bool:
        def to_bool(s):
            v = str(s).strip().lower()
            if v in ("1", "true", "yes", "on"):
                return True
            if v in ("0", "false", "no", "off"):
                return False
            raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")
        return to_bool
    if tp in (int, float, str):
        return tp
    if tp is Path:
        return Path
    return str


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def build_parser(config_cls: type, prog: str | None = None, description: str | None = None) -> argparse.ArgumentParser:
    parser = _Parser(prog=prog, description=description, argument_default=argparse.SUPPRESS,
                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file of option values (flags override it)")
    hints = _field_types(config_cls)
    for f in dataclasses.fields(config_cls):
        if f.metadata.get("cli") is False:
            continue
        flag = "--" + f.name.replace("_", "-")
        tp, optional = _unwrap_optional(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        help_ = f.metadata.get("help", "")
        help_ = f"{help_} (default: {default!r})" if help_ else f"default: {default!r}"
        kw: dict[str, Any] = {"dest": f.name, "help": help_}
        origin = typing.get_origin(tp)
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif origin in (list, tuple):
            (inner,) = typing.get_args(tp)[:1]
            parser.add_argument(flag, nargs="+", type=_converter(inner, flag), metavar="V", **kw)
        elif origin is Literal:
            choices = typing.get_args(tp)
            parser.add_argument(flag, choices=choices, type=type(choices[0]), **kw)
        else:
            parser.add_argument(flag, type=_converter(tp, flag), metavar=f.name.upper(), **kw)
    return parser


def _coerce_yaml(config_cls, key: str, value, path: str):
    hints = _field_types(config_cls)
    tp, optional = _unwrap_optional(hints[key])
    if value is None:
        if optional:
            return None
        raise UserError(f"--config {path}: {key} must not be empty")
    origin = typing.get_origin(tp)
    try:
        if origin in (list, tuple):
            (inner,) = typing.get_args(tp)[:1]
            items = value if isinstance(value, list) else [value]
            conv = _converter(inner, key)
            return [conv(v) if not isinstance(v, (int, float, bool)) or inner is str else v for v in items]
        if origin is Literal:
            if value not in typing.get_args(tp):
                raise argparse.ArgumentTypeError(f"expected one of {typing.get_args(tp)}")
            return value
        if tp is bool and isinstance(value, bool):
            return value
        if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if tp is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(tp, list) and isinstance(value, (int, float, str)) and type(value) in tp:
            return value
        return _converter(tp, key)(str(value))
    except (ValueError, argparse.ArgumentTypeError) as e:
        raise UserError(f"--config {path}: {key}: invalid value {value!r} ({e})") from None


def load_yaml_config(config_cls: type, path: str) -> dict[str, Any]:
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
    names = {f.name for f in dataclasses.fields(config_cls)}
    out = {}
    for k, v in data.items():
        key = str(k).replace("-", "_")
        if key not in names:
            raise UserError(f"--config {path}: unknown option {k!r}")
        out[key] = _coerce_yaml(config_cls, key, v, path)
    return out


def parse_config(config_cls: type[T], argv: list[str] | None = None, prog: str | None = None,
                 description: str | None = None) -> T:
    parser = build_parser(config_cls, prog, description)
    ns = vars(parser.parse_args(argv))
    values = {}
    if "config" in ns:
        values.update(load_yaml_config(config_cls, ns.pop("config")))
    values.update(ns)
    try:
        return config_cls(**values)
    except (ValueError, TypeError) as e:
        raise UserError(str(e)) from None


def run(main: Callable[[T], Any], config_cls: type[T], argv: list[str] | None = None, prog: str | None = None,
        description: str | None = None) -> int:
    """Parse the command line into `config_cls`, call `main(config)`, turn user errors into one line."""
    prog = prog or os.path.basename(sys.argv[0])
    try:
        cfg = parse_config(config_cls, argv, prog, description)
        main(cfg)
        return 0
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except (UserError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as e:
        if os.environ.get("SSM_DEBUG"):
            raise
        msg = str(e) if isinstance(e, UserError) else _os_error_line(e)
        print(f"{prog}: error: {msg}", file=sys.stderr)
        return 2


def _os_error_line(e: OSError) -> str:
    if e.filename:
        return f"{e.filename}: {e.strerror or e}"
    return str(e)


def main_entry(main: Callable[[T], Any], config_cls: type[T], prog: str, description: str | None = None) -> None:
    """`if __name__ == "__main__": main_entry(main, Config, "python -m pkg.mod")`."""
    sys.exit(run(main, config_cls, prog=prog, description=description))
