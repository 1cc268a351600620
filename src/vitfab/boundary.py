"""The command line's error boundary: what a failure looks like to the user.

- A :class:`VitfabError` (bad input, a folder in use, ...) is one line on stderr, exit 2.
- A failure of the environment, by errno (disk full or over quota, permission denied, read-only
  file system, a path through a file, a folder where a file belongs, too many open files, a
  missing file *the user named*, a folder to make where a file lies), is also one line and exit
  2, whether it came as an ``OSError`` or inside a writer's own exception (safetensors, ONNX,
  OpenVINO). Every write of a run folder
  is atomic, so the folder is left as it was before the write; where a run was being written the
  line says how to continue it.
- Anything else is a bug in vitfab and keeps its traceback (exit 1).
- ``--debug`` anywhere on the command line, or ``VITFAB_DEBUG=1``, prints the traceback of any
  error before its line.
"""

from __future__ import annotations

import errno
import gc
import os
import resource
import sys
import traceback
from pathlib import Path
from typing import Callable, Sequence

from .errors import EnvironmentFailure, VitfabError, errno_of, exception_chain
from .files import free_bytes
from .lock import RUN_FOLDER_ATTR
from .rundir import CONFIG_FILE

DEBUG_FLAG, DEBUG_ENV = "--debug", "VITFAB_DEBUG"


def guarded(app: Callable[[list[str]], object], argv: Sequence[str] | None = None) -> int:
    """Run ``app(args)`` behind the boundary (see the module doc); returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in args or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    args = [a for a in args if a != DEBUG_FLAG]
    try:
        app(args)
    except SystemExit as exc:  # typer's standalone mode: --help, usage errors, Exit
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
    except Exception as exc:
        line = failure_line(exc, args)
        if line is None:
            raise
        if debug:
            traceback.print_exc()
        else:
            _release_quietly(exc)
        sys.stderr.write(f"error: {line}\n")
        return 2
    return 0


def _release_quietly(exc: BaseException) -> None:
    """Free the failed command's frames now, keeping quiet the errors that half-built objects'
    ``__del__`` raise on the way (a DataLoader whose workers could not start, at EMFILE): the one
    line says what happened, and nothing should follow it."""
    saved = sys.unraisablehook
    sys.unraisablehook = lambda unraisable: None
    try:
        for link in exception_chain(exc, suppressed=True):
            traceback.clear_frames(link.__traceback__)
        gc.collect()
    finally:
        sys.unraisablehook = saved


def failure_line(exc: BaseException, args: Sequence[str] = ()) -> str | None:
    """The one line for a user's or the environment's error; None for a bug (keeps its traceback)."""
    if isinstance(exc, VitfabError) and not isinstance(exc, EnvironmentFailure):
        return str(exc)  # its own line, whatever OS error it may quote
    found = errno_of(exc)
    if found is None:
        return None
    code, path = found
    if code == errno.EEXIST and _file_on_the_way(path):  # a folder to make where a file lies
        code = errno.ENOTDIR
    if (code == errno.ENOENT and not _user_path(path, args)) or code == errno.EEXIST:
        return None
    nbytes = next((e.nbytes for e in exception_chain(exc) if isinstance(e, EnvironmentFailure)), None)
    run = getattr(exc, RUN_FOLDER_ATTR, None)
    where = path or "a file"
    if code in (errno.ENOSPC, errno.EDQUOT):
        what = "no space left on device" if code == errno.ENOSPC else "disk quota exceeded"
        size = f"{_size(nbytes)} to write, " if nbytes else ""
        return (f"{what} writing {where} ({size}{_free(path)} free there); nothing was half written: free "
                f"space, then {_continue(run, args)}")
    if code == errno.EROFS:
        return f"read-only file system: cannot write {where}; choose a folder on a writable disk (--out)"
    if code in (errno.EACCES, errno.EPERM):
        return f"permission denied: {where} ({os.strerror(code)}); check its owner and mode, or choose another folder"
    if code == errno.ENOTDIR:
        blocker = _file_on_the_way(path)
        because = f"{blocker} is a file, not a folder" if blocker else "a part of it is a file, not a folder"
        return f"cannot use {where}: {because}; choose another path"
    if code == errno.EISDIR:
        return f"{where} is a folder where a file was expected"
    if code == errno.EMFILE:
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        return (f"too many open files (this process may open {soft}): raise the limit (ulimit -n 4096) or use "
                f"fewer data-loading workers, then {_continue(run, args)}")
    return f"not found: {where}"


def _user_path(path: str | None, args: Sequence[str]) -> bool:
    """Whether ``path`` is a path the user gave on the command line, one inside it or above it."""
    if not path:
        return False
    target = Path(os.path.abspath(path))
    for arg in args:
        value = arg.split("=", 1)[1] if arg.startswith("--") and "=" in arg else arg
        if not value or value.startswith("-"):
            continue
        given = Path(os.path.abspath(value))
        if target == given or target.is_relative_to(given) or given.is_relative_to(target):
            return True
    return False


def _continue(run: str | None, args: Sequence[str]) -> str:
    """How to go on after the failure: resume the run it was writing, else the same command again."""
    words = [a for a in args[:2] if not a.startswith("-")]
    run = run if run is not None else _started_run(args)
    if run is not None and words and words[0] in ("run", "train", "nas") and "--resume" not in args:
        command = "nas train" if words[0] == "nas" else words[0]
        return f"continue with: vitfab {command} --resume {run}"
    return "run the same command again" + (f" (it continues {run})" if run is not None else "")


def _started_run(args: Sequence[str]) -> str | None:
    """The ``--out`` folder of the command where it already holds a run (its config is written)."""
    for i, arg in enumerate(args):
        value = arg.split("=", 1)[1] if arg.startswith("--out=") else (
            args[i + 1] if arg == "--out" and i + 1 < len(args) else None)
        if value and (Path(value) / CONFIG_FILE).is_file():
            return value
    return None


def _free(path: str | None) -> str:
    free = free_bytes(path or ".")
    return "unknown" if free is None else _size(free)


def _file_on_the_way(path: str | None) -> Path | None:
    """The first part of ``path`` that exists as a file (why ``path`` cannot be a folder)."""
    if not path:
        return None
    for parent in [*reversed(Path(path).parents), Path(path)]:
        if parent.is_file():
            return parent
    return None


def _size(n: float) -> str:
    if n < 1000:
        return f"{n:.0f} B"
    for unit in ("kB", "MB", "GB"):
        n /= 1000
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}"
