"""``lmforge pretrain``: the pretraining recipe (``runs/pretrain.py``), then a one-line summary."""

from __future__ import annotations

from lmforge.commands._console import console, is_main_process
from lmforge.runs.config import PretrainConfig

Config = PretrainConfig


def run(cfg: PretrainConfig) -> None:
    from lmforge.runs.pretrain import pretrain

    summary = pretrain(cfg)
    if not is_main_process():
        return
    best = summary["best_val_loss"]
    minutes = summary["seconds"] / 60
    text = f"[green]done[/green]: {summary['steps']} steps, {summary['tokens']:,} tokens in {minutes:.1f} min"
    if best is not None:
        text += f", best validation loss {best:.4f}"
    console.print(f"{text}; model directory {cfg.out}")
