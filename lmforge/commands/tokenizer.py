"""``lmforge tokenizer train``: train a WordPiece or byte-level BPE tokenizer (``data/tokenizer.py``)."""

from __future__ import annotations

from lmforge.commands._console import console
from lmforge.data.tokenizer import TokenizerTrainConfig, train_command

Config = TokenizerTrainConfig


def run(cfg: TokenizerTrainConfig) -> None:
    from lmforge.rundir.layout import check_output_dir

    check_output_dir(cfg.out)  # a model's or run's tokenizer is never replaced
    tok = train_command(cfg)
    console.print(f"[green]wrote[/green] {cfg.out}: {cfg.kind} tokenizer, {tok.vocab_size} tokens")
