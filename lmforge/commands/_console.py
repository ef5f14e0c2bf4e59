"""The console every command prints to (rich), and the one table printer."""

from __future__ import annotations

import os
import sys

from rich.console import Console
from rich.table import Table

console = Console()


def is_main_process() -> bool:
    """Under torchrun only the first process reports."""
    return os.environ.get("RANK", "0") == "0"


def print_table(title: str, header: list[str] | tuple[str, ...], rows: list[list[str]] | list[tuple[str, ...]]) -> None:
    """A table: columns of numbers right-aligned, the first column and any column of words left-aligned."""
    table = Table(title=title)
    for i, col in enumerate(header):
        numeric = i > 0 and all(_numeric(row[i]) for row in rows)
        table.add_column(col, justify="right" if numeric else "left")
    for row in rows:
        table.add_row(*row)
    console.print(table)


def _numeric(cell: str) -> bool:
    head = cell.split(" ")[0].replace(",", "").replace("%", "").lstrip("+-")
    return cell == "-" or head.replace(".", "", 1).isdigit()


def write_stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()
