"""Progress display for long work (rich), silent when output is not a terminal or in CI."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from moma_core.train import ProgressFn

console = Console(stderr=True)


def _enabled() -> bool:
    return sys.stderr.isatty() and not os.environ.get("CI")


@contextmanager
def progress_bar(description: str) -> Iterator[ProgressFn]:
    """A :data:`ProgressFn` that draws a bar with the running loss."""
    if not _enabled():
        yield lambda step, total, metrics: None
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task(description, total=None, info="")

        def update(step: int, total: int, metrics: dict[str, float]) -> None:
            info = " ".join(f"{k}={v:.3f}" for k, v in metrics.items())
            bar.update(task, completed=step, total=total, info=info)

        yield update
