"""``lmforge distill classify|ner``: a teacher's soft targets (cached) into a smaller student (``runs/distill.py``)."""

from __future__ import annotations

from lmforge.commands.finetune import show
from lmforge.runs.config import DistillClassifyConfig, DistillNERConfig


def run(cfg: DistillClassifyConfig | DistillNERConfig) -> None:
    from lmforge.runs.distill import distill
    from lmforge.tasks import task_of_config

    show(distill(cfg, progress=cfg.training.progress), task_of_config(cfg), cfg)
