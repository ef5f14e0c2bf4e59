"""``lmforge distill classify|ner``: a teacher's soft targets (cached) into a smaller student (``runs/distill.py``)."""

from __future__ import annotations

from lmforge.commands.finetune import show
from lmforge.runs.config import DistillClassifyConfig, DistillNERConfig


def run(cfg: DistillClassifyConfig | DistillNERConfig) -> None:
    from lmforge.runs.distill import distill, task_of

    show(distill(cfg, progress=cfg.training.progress), task_of(cfg), cfg)
