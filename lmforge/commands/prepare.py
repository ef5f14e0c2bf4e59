"""``lmforge prepare``: tokenize corpora into token shards for pretraining (``data/shards.py``)."""

from __future__ import annotations

from lmforge.commands._console import console
from lmforge.data.shards import PrepareConfig, prepare

Config = PrepareConfig


def run(cfg: PrepareConfig) -> None:
    console.print(f"[green]token shards ready[/green] in {prepare(cfg)}")
