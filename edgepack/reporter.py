"""The one place the library talks to the user: status lines and rich progress bars.

Library code calls `get_reporter()`; the CLI configures it (quiet for --json). Nothing else prints.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

T = TypeVar("T")


class Reporter:
    def __init__(self, *, quiet: bool = False) -> None:
        self.quiet = quiet
        self.console = Console(stderr=True, highlight=False, soft_wrap=True)  # logs keep whole lines

    def info(self, message: str) -> None:
        if not self.quiet:
            self.console.print(message)

    def warn(self, message: str) -> None:
        self.console.print(f"[yellow]warning:[/yellow] {message}")

    @contextlib.contextmanager
    def step(self, title: str) -> Iterator[None]:
        """A stage that has no natural count: a spinner line while it runs."""
        if self.quiet or not sys.stderr.isatty():
            self.info(f"- {title}")
            yield
            return
        with self.console.status(title):
            yield
        self.console.print(f"[green]✓[/green] {title}")

    def track(self, items: Iterable[T], *, total: int | None, title: str) -> Iterator[T]:
        """Iterate with a progress bar (a plain line when quiet or not a terminal)."""
        if self.quiet:
            yield from items
            return
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=self.console, transient=False, disable=not sys.stderr.isatty()) as bar:
            task = bar.add_task(title, total=total)
            for item in items:
                yield item
                bar.advance(task)
        if not sys.stderr.isatty():
            self.info(f"- {title}: done")


_reporter = Reporter()


def get_reporter() -> Reporter:
    return _reporter


def set_reporter(reporter: Reporter) -> None:
    global _reporter
    _reporter = reporter
