"""Output helpers shared by commands: stderr for people, tables that read well on a terminal and in a pipe."""

from __future__ import annotations

from collections.abc import Sequence

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

stderr = Console(stderr=True, highlight=False, soft_wrap=True)
"""Progress, warnings and errors: everything that is not the command's result."""


def table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """A rich table on a terminal; aligned plain text when stdout is a pipe or file."""
    console = Console(highlight=False, soft_wrap=True)
    if console.is_terminal:
        rich_table = Table()
        for column in columns:
            rich_table.add_column(column)
        for row in rows:
            rich_table.add_row(*(Text(str(cell)) for cell in row))  # cells are data, never markup
        console.print(rich_table)
        return
    widths = [max(len(str(x)) for x in col) for col in zip(columns, *rows)]
    for row in (columns, *rows):
        typer.echo("  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip())
