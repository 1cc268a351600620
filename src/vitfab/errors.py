"""User-facing errors: the CLI prints these as one line and exits non-zero, no traceback."""

from __future__ import annotations

import errno
import os
import re
from typing import Iterator


class VitfabError(Exception):
    """An error caused by the user's input or environment, with a message that says what to do."""


class DataError(VitfabError):
    """A dataset folder or image that vitfab cannot use."""


class CheckpointError(VitfabError):
    """A checkpoint or weights file that vitfab cannot load."""


# --------------------------------------------------------------------------- the environment
# Failures of the machine rather than of vitfab: each is one line and exit 2 (``vitfab.boundary``).
ENVIRONMENT_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR,
                      errno.EISDIR, errno.ENOENT, errno.EMFILE, errno.EEXIST)
NAMED_ONLY = (errno.ENOENT, errno.EEXIST)  # count only with the file's name: the boundary judges it
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how safetensors (Rust's io::Error) quotes errno


class EnvironmentFailure(OSError):
    """An OS error while writing ``path`` (``nbytes`` the size of the write where known).

    Raised by :func:`vitfab.files.writing` around a write, with the error the writer raised as its
    cause; :mod:`vitfab.boundary` turns it into the one line the user reads. An ``OSError``, not a
    :class:`VitfabError`: code that handles bad input (an export that may fail and is reported)
    must not swallow a full disk.
    """

    def __init__(self, code: int, path: str | None, nbytes: int | None = None):
        super().__init__(code, os.strerror(code), path)
        self.nbytes = nbytes


def exception_chain(exc: BaseException | None, suppressed: bool = False) -> Iterator[BaseException]:
    """``exc``, then its cause or context, and so on (each once); ``suppressed``: also the context
    that ``raise ... from None`` hid."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or (exc.__context__ if suppressed or not exc.__suppress_context__ else None)


def errno_of(exc: BaseException) -> tuple[int, str | None] | None:
    """``(errno, filename or None)`` of an environment failure anywhere in ``exc``'s chain, else None.

    Besides ``OSError`` this reads the writers that wrap one in their own exception: safetensors
    (``... (os error 28)``) and C++ writers (ONNX, OpenVINO, a DataLoader worker's re-raise) that
    quote the OS's message, e.g. ``No space left on device``. Such text without a file name never
    counts as ENOENT or EEXIST (``NAMED_ONLY``): a missing file that the user did not name, or a
    folder made twice, is a bug, not the environment.
    """
    for link in exception_chain(exc):
        if isinstance(link, OSError) and link.errno in ENVIRONMENT_ERRNOS:  # EnvironmentFailure too
            return link.errno, link.filename if link.filename is None else str(link.filename)
        text = str(link)
        found = _RUST_OS_ERROR.search(text)
        if found and int(found.group(1)) in ENVIRONMENT_ERRNOS and int(found.group(1)) not in NAMED_ONLY:
            return int(found.group(1)), None
        for code in ENVIRONMENT_ERRNOS:
            if code not in NAMED_ONLY and os.strerror(code) in text:
                return code, None
    return None
