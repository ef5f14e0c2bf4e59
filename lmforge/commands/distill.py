"""``lmforge distill``: a classify teacher's soft targets (cached) into a smaller student (``runs/distill.py``)."""

from __future__ import annotations

from lmforge.commands._console import console, is_main_process, print_table
from lmforge.runs.config import DistillClassifyConfig


def run(cfg: DistillClassifyConfig) -> None:
    from lmforge.runs.distill import TASK, distill

    result = distill(cfg, progress=cfg.training.progress)
    if result is None or not is_main_process():
        return
    header, rows = result.table()
    print_table(f"{TASK}: {cfg.out}", header, rows)
    console.print(f"[green]done[/green] in {result.wall_seconds / 60:.1f} min; run directory {cfg.out}")
    console.print(f"use it: lmforge predict --model {cfg.out} --input TEXTS --output OUT.jsonl", highlight=False)
