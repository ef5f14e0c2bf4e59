"""``lmforge finetune classify | ner | translate | chat | embed``: the one recipe (``runs/finetune.py``),
then its table."""

from __future__ import annotations

from lmforge.commands._console import console, is_main_process, print_table
from lmforge.runs.config import FinetuneConfig
from lmforge.tasks import TASKS, task_of_config


def run(cfg: FinetuneConfig) -> None:
    from lmforge.runs.finetune import finetune

    task = task_of_config(cfg)
    show(finetune(cfg, task), task, cfg)


def show(result, task: str, cfg: FinetuneConfig) -> None:
    """The result's table, the time it took and how to use the run (first process only)."""
    if result is None or not is_main_process():
        return
    header, rows = result.table()
    print_table(f"{task}: {cfg.out}", header, rows)
    console.print(f"[green]done[/green] in {result.wall_seconds / 60:.1f} min; run directory {cfg.out}")
    if TASKS[task].use:
        console.print("use it: " + TASKS[task].use.format(out=cfg.out), highlight=False)
