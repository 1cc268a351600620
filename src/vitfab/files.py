"""Atomic file writes: a reader (or a resumed run) never sees a half-written file."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .errors import EnvironmentFailure, errno_of


@contextmanager
def writing(path: str | os.PathLike, nbytes: int | None = None) -> Iterator[None]:
    """Name the destination (and the size, where known) in an environment failure of the write
    inside: it leaves as :class:`EnvironmentFailure` from the writer's own error. Nested, the
    outermost destination is named (the folder a user knows, not a temporary file in it). An error
    on a file elsewhere, or a missing file (a read inside the block), keeps its own name. A writer
    whose error says nothing of the cause (``torch.save``: ``unexpected pos ...``) counts as a full
    disk where the disk is, at that moment, full."""
    try:
        yield
    except EnvironmentFailure as exc:
        if not _beside(exc.filename, path):
            raise
        raise EnvironmentFailure(exc.errno, str(path), exc.nbytes or nbytes) from exc.__cause__
    except Exception as exc:
        found = errno_of(exc)
        if found is None and _no_space_left(path):
            found = (errno.ENOSPC, None)
        if found is None or found[0] == errno.ENOENT or not _beside(found[1], path):
            raise
        raise EnvironmentFailure(found[0], str(path), nbytes) from exc


def free_bytes(path: str | os.PathLike) -> int | None:
    """Bytes left to write on the filesystem that holds ``path`` (or would hold it); None unknown."""
    probe = Path(os.path.abspath(path))
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return shutil.disk_usage(probe).free
    except OSError:
        return None


def _no_space_left(path: str | os.PathLike) -> bool:
    free = free_bytes(path)
    return free is not None and free < 2**20  # less than a MiB


def _beside(name: str | None, path: str | os.PathLike) -> bool:
    """Whether an error's file is ``path``, in it, or beside it (its temporary copy); True unnamed."""
    if name is None:
        return True
    parent = Path(os.path.abspath(path)).parent
    return Path(os.path.abspath(name)).is_relative_to(parent)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename."""
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        try:
            yield tmp_path
            with open(tmp_path, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp_path, path)
        finally:
            if tmp_path.exists():
                tmp_path.unlink()


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder; on success it takes the place of ``path``.

    The old folder is first renamed to ``<path>.prev`` and removed after the swap, so at every
    instant either ``path`` or ``<path>.prev`` holds a complete copy (see :func:`existing_dir`).
    """
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        prev = path.with_name(path.name + ".prev")
        try:
            yield tmp
            for f in tmp.iterdir():
                if f.is_file():
                    with open(f, "rb") as fh:
                        os.fsync(fh.fileno())
            if path.exists():
                if prev.exists():
                    shutil.rmtree(prev)
                os.replace(path, prev)
            os.replace(tmp, path)
            if prev.exists():
                shutil.rmtree(prev)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)


def existing_dir(path: str | os.PathLike) -> Path | None:
    """The complete copy of an :func:`atomic_dir` folder: ``path``, else ``<path>.prev``."""
    path = Path(path)
    if path.is_dir():
        return path
    prev = path.with_name(path.name + ".prev")
    return prev if prev.is_dir() else None
