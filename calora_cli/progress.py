"""Progress bars on a terminal, silence in CI logs and pipes."""

from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterator

Advance = Callable[..., None]


@contextlib.contextmanager
def progress(description: str, total: int | None, enabled: bool = True) -> Iterator[Advance]:
    """Yield `advance(n=1, **fields)`; draws a rich bar on stderr only when it is a terminal."""
    if not enabled or not sys.stderr.isatty():
        yield lambda n=1, **fields: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=Console(stderr=True),
        transient=True,
    )
    with bar:
        task = bar.add_task(description, total=total, info="")

        def advance(n: int = 1, **fields: object) -> None:
            info = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())
            bar.update(task, advance=n, info=info)

        yield advance
