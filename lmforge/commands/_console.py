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
    """A table with the first column (and any 'decoding' / 'architecture' column) left-aligned, numbers right."""
    table = Table(title=title)
    for i, col in enumerate(header):
        left = i == 0 or col in ("metric", "decoding", "architecture", "baseline")
        table.add_column(col, justify="left" if left else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)


def write_stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()
