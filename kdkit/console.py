"""The console (stderr) and rich progress bars, printed by the main process only; shared by every package."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from accelerate import Accelerator
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


@contextmanager
def progress_bar(accelerator: Accelerator, description: str, total: int,
                 enabled: bool = True) -> Iterator[Callable[..., None]]:
    """Yields advance(**fields): one step of a bar (with optional text fields shown after it)."""
    if not (enabled and accelerator.is_main_process):
        yield lambda **_: None
        return
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
    with Progress(*columns, console=console, transient=True) as prog:
        task = prog.add_task(description, total=total, info="")

        def advance(**fields: float) -> None:
            info = " ".join(f"{k} {v:.4g}" for k, v in fields.items())
            prog.update(task, advance=1, info=info)

        yield advance
