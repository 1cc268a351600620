"""One writer per run folder: an exclusive ``fcntl.flock`` on ``<run>/.lock``.

Every command that writes a run folder (``train``, ``nas train``, ``run``, ``sweep``, each also
with ``--resume``) holds the lock while it runs; a second process on the same folder stops at
once with one line naming the holder's pid. The OS releases a flock when its process dies, so a
``kill -9`` never leaves a stale lock: the lock file stays, the lock does not. Under ``torchrun``
only rank 0 (the one that writes) locks. A process may take a lock it holds again (nested
blocks on one folder): only the outermost block takes and releases it.

``flock`` is advisory and local: on some network filesystems (older NFS, some SMB mounts) it
does not exclude a process on another machine; keep concurrent writers of one run folder on one
machine.
"""

from __future__ import annotations

import errno
import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import VitfabError
from .rundir import LOCK_FILE
from .runtime import broadcast_object, world

RUN_FOLDER_ATTR = "vitfab_run_folder"  # set on an error that leaves a locked block: the run it interrupted
_held: dict[Path, int | None] = {}  # this process's locks: folder -> fd (None on ranks other than 0)


class FolderLocked(VitfabError):
    """Another process writes this run folder."""


@contextmanager
def run_lock(folder: str | os.PathLike) -> Iterator[None]:
    """Hold ``folder``'s lock (the folder must exist) for the block; see the module doc.

    Under ``torchrun`` every rank calls it: rank 0 takes the lock and tells the others whether
    it could, so that a refused run stops on every rank instead of leaving them waiting.
    """
    key = Path(os.path.abspath(folder))
    if key in _held:  # this process holds it already (an outer block releases it)
        yield
        return
    fd, refused, failure = None, None, None
    if world()[0] == 0:
        try:
            fd = _acquire(key)
        except FolderLocked as exc:
            refused = str(exc)
        except Exception as exc:  # e.g. a full or read-only disk: the other ranks must not wait
            failure, refused = exc, f"run folder {folder}: rank 0 could not take its lock ({exc})"
    refused = broadcast_object(refused)
    if failure is not None:
        _name_run(failure, folder)
        raise failure
    if refused is not None:
        raise FolderLocked(refused)
    _held[key] = fd
    try:
        yield
    except Exception as exc:  # the outermost lock names the run (a main job, not its stage's folder)
        _name_run(exc, folder)
        raise
    finally:
        fd = _held.pop(key, None)  # None also in a forked child, which closed its copy at the fork
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def _name_run(exc: BaseException, folder: str | os.PathLike) -> None:
    try:
        setattr(exc, RUN_FOLDER_ATTR, str(folder))
    except (AttributeError, TypeError):  # an exception type without attributes of its own
        pass


def _acquire(folder: Path) -> int:
    """The locked descriptor of ``folder``'s lock file, the holder's pid written in it."""
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise FolderLocked(f"run folder {folder} is in use by another vitfab process (pid {holder}); wait for "
                               f"it to finish or stop it, then try again") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except BaseException:
        os.close(fd)  # closing the only descriptor also drops a lock just taken
        raise
    return fd


def _close_in_child() -> None:
    """A forked child (a DataLoader worker) drops its copies of the lock descriptors: a flock
    belongs to the open file, so a worker orphaned by a ``kill -9`` of its parent would otherwise
    hold the run folder until it exits. Closing a copy leaves the parent's lock as it is."""
    for fd in _held.values():
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass
    _held.clear()


os.register_at_fork(after_in_child=_close_in_child)

