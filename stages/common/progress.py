"""Rich progress bars on stderr (results go to stdout)."""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

stderr = Console(stderr=True)


class _Rate(TextColumn):
    def __init__(self, unit: str):
        super().__init__("")
        self.unit = unit

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:.2f} {self.unit}/s" if speed else f"- {self.unit}/s", style="progress.data.speed")


@contextlib.contextmanager
def progress_bar(label: str, total: int, enabled: bool = True, unit: str = "it",
                 extra: str = "") -> Iterator[Callable[..., None]]:
    """Yields ``advance(n=1, **fields)``; a no-op when ``enabled`` is False."""
    if not enabled:
        yield lambda n=1, **kw: None
        return
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
               _Rate(unit), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn()]
    if extra:
        columns.append(TextColumn(extra))
    with Progress(*columns, console=stderr, refresh_per_second=4) as bar:
        task = bar.add_task(label, total=total)

        def advance(n: int = 1, **fields) -> None:
            bar.update(task, advance=n, **fields)

        yield advance
