"""``lmforge prepare``: tokenize corpora into token shards for pretraining (``data/shards.py``)."""

from __future__ import annotations

from lmforge.commands._console import console
from lmforge.data.shards import PrepareConfig, prepare

Config = PrepareConfig


def run(cfg: PrepareConfig) -> None:
    from lmforge.rundir.layout import check_output_dir

    check_output_dir(cfg.out, inputs=[cfg.tokenizer])  # shards never go into a model, a run or the tokenizer
    console.print(f"[green]token shards ready[/green] in {prepare(cfg)}")
