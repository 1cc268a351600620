"""Progress bars (rich) on stderr, so that ``--json`` output on stdout stays clean."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)


def make_progress(enabled: bool = True) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        disable=not enabled,
        transient=False,
    )


@contextmanager
def task(description: str, total: int | None, enabled: bool = True, parent: Progress | None = None) -> Iterator:
    """A progress bar; yields ``advance(n=1, info=None)``.

    With ``parent`` the bar is added to that (already live) display and removed when done.
    """

    def run(progress: Progress) -> Iterator:
        tid = progress.add_task(description, total=total, info="")

        def advance(n: int = 1, info: str | None = None) -> None:
            if info is None:
                progress.update(tid, advance=n)
            else:
                progress.update(tid, advance=n, info=info)

        try:
            yield advance
        finally:
            if parent is not None:
                progress.remove_task(tid)

    if parent is not None:
        yield from run(parent)
        return
    with make_progress(enabled) as progress:
        yield from run(progress)
