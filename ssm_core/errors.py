"""The last line of defence of every command: whatever escapes becomes one line on stderr and an exit status.

    code = report(exc, prog)        # inside `except BaseException as exc:` of the command runner
    sys.exit(guard(main, prog)(cfg))

* `UserError` (bad flag, file or data): `prog: error: <message>`, status 2.
* An OSError that names a file (missing, not writable, read-only file system, disk full): the file and the
  reason, status 2: the user can fix it by choosing another path or freeing space.
* SIGTERM / SIGINT (Lightning turns SIGTERM into `SIGTERMException`, a SystemExit with no status, i.e. 0):
  `prog: stopped by SIGTERM` plus what was saved, status 128 + the signal number, so schedulers and shells
  see that the run did not finish.
* A broken pipe (the output piped into `head`): nothing, status 141, as other Unix tools.
* Anything else: `prog: error: <Type>: <first line> (hint)`, status 1. The hint says what usually helps
  (out of memory: a smaller --batch-size) and how to see the traceback.

The traceback is shown instead when `--debug` is on the command line or SSM_DEBUG=1 is set: then the
exception is re-raised untouched. Notes added to an exception (`exc.add_note`, e.g. "checkpoint saved to
...") are appended to its line.
"""
from __future__ import annotations

import errno
import os
import signal
import sys
from typing import Any, Callable, Sequence

from .io import intended_path


class UserError(Exception):
    """A problem with the user's input (file, flag, data). Printed as one line; exit status 2."""


DEBUG_FLAG = "--debug"
DEBUG_HINT = f"rerun with {DEBUG_FLAG} (or SSM_DEBUG=1) to see the traceback"

# errno values of an OSError that a user fixes by choosing another path or freeing space: exit 2, no traceback.
_USER_ERRNOS = {
    errno.ENOENT: "no such file or folder",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EISDIR: "is a folder",
    errno.ENOTDIR: "a part of the path is not a folder",
    errno.EEXIST: "already exists",
    errno.ENAMETOOLONG: "file name too long",
}


def debug_requested(argv: Sequence[str] | None = None) -> bool:
    """True when tracebacks are wanted: SSM_DEBUG set (and not 0/false) or --debug among the arguments."""
    env = os.environ.get("SSM_DEBUG", "").strip().lower()
    if env and env not in ("0", "false", "no", "off"):
        return True
    return DEBUG_FLAG in (sys.argv[1:] if argv is None else argv)


def strip_debug_flag(argv: Sequence[str]) -> tuple[list[str], bool]:
    """(argv without --debug, whether it was there): lets a parser that does not know --debug run first."""
    rest = [a for a in argv if a != DEBUG_FLAG]
    return rest, len(rest) != len(argv)


MAX_DETAIL = 300   # characters of an unexpected exception's message kept on its line


def _first_line(exc: BaseException) -> str:
    """The message's first line; when that only introduces what follows ("...:"), the next line too."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    if not lines:
        return ""
    line = f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]
    return line if len(line) <= MAX_DETAIL else line[:MAX_DETAIL - 3] + "..."


def _notes(exc: BaseException) -> str:
    notes = [n.strip() for n in getattr(exc, "__notes__", ()) if str(n).strip()]
    return "; ".join(notes)


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(code - 128).name
    except ValueError:
        return "a signal"


def _is_sigterm_exit(exc: BaseException) -> bool:
    # Only a running Lightning Trainer raises SIGTERMException, so its module is loaded by then; importing
    # Lightning to ask (5 s on a 2-core machine) would slow every one-line error of a command that never
    # trained.
    exceptions = sys.modules.get("lightning.pytorch.utilities.exceptions")
    return exceptions is not None and isinstance(exc, exceptions.SIGTERMException)


def _hint(exc: BaseException) -> str:
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc):
        return "out of memory: try a smaller --batch-size, fewer --devices or a shorter sequence length"
    if "loading state_dict" in str(exc):
        return ("the checkpoint was written for another model: --resume needs the model options of the run "
                f"that wrote it (or start anew with --overwrite); {DEBUG_HINT}")
    if isinstance(exc, RecursionError):
        return DEBUG_HINT
    return f"an unexpected error; {DEBUG_HINT}"


def one_line(exc: BaseException) -> str:
    """The message for `exc`, without the program name: one line, no traceback."""
    notes = _notes(exc)
    if isinstance(exc, UserError):
        line = _first_line(exc)
    elif isinstance(exc, OSError) and exc.errno in _USER_ERRNOS:
        reason = _USER_ERRNOS[exc.errno]
        # The file the user asked for, not the temporary name it was being written under.
        line = f"{intended_path(exc.filename)}: {reason}" if exc.filename else f"{reason} ({_first_line(exc)})"
    elif isinstance(exc, KeyboardInterrupt) or _is_sigterm_exit(exc):
        code = exit_code(exc)
        line = f"stopped by {_signal_name(code)}"
    else:
        detail = _first_line(exc)
        line = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
        line = f"{line} ({_hint(exc)})"
    return f"{line}; {notes}" if notes else line


def exit_code(exc: BaseException) -> int:
    """The process status for `exc`: 2 for what the user can fix, 128 + signal for a stop, 1 otherwise."""
    if isinstance(exc, UserError):
        return 2
    if isinstance(exc, OSError) and exc.errno in _USER_ERRNOS:
        return 2
    if isinstance(exc, KeyboardInterrupt):
        return 128 + signal.SIGINT
    if _is_sigterm_exit(exc):
        # A stop that recorded its signal (ssm_core.callbacks.SignalCheckpoint) carries it as its code.
        code = exc.code if isinstance(exc.code, int) and exc.code > 128 else 128 + signal.SIGTERM
        return code
    return 1


def report(exc: BaseException, prog: str, debug: bool | None = None) -> int:
    """Print `prog: ...` for `exc` on stderr and return the exit status; re-raise it when debugging.

    A plain SystemExit (argparse's --help, sys.exit in a command) is not an error and is re-raised as is."""
    if isinstance(exc, SystemExit) and not _is_sigterm_exit(exc):
        raise exc
    if debug if debug is not None else debug_requested():
        raise exc
    if isinstance(exc, BrokenPipeError):
        # The reader of our output went away (`... | head`): as for any Unix tool, end quietly with
        # 128 + SIGPIPE. Output still buffered would fail again at exit, so it goes nowhere instead.
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 128 + signal.SIGPIPE
    stopped = isinstance(exc, KeyboardInterrupt) or _is_sigterm_exit(exc)
    kind = "" if stopped else "error: "
    print(f"{prog}: {kind}{one_line(exc)}", file=sys.stderr, flush=True)
    return exit_code(exc)


def guard(main: Callable[..., Any], prog: str, debug: bool | None = None) -> Callable[..., int]:
    """`main` wrapped so that it returns an exit status (0 on success) instead of raising."""
    def guarded(*args: Any, **kwargs: Any) -> int:
        try:
            main(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 (the point of this function: nothing escapes as a traceback)
            return report(exc, prog, debug)
        return 0
    guarded.__name__ = getattr(main, "__name__", "guarded")
    guarded.__doc__ = main.__doc__
    return guarded
