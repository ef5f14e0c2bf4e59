"""``lmforge distill``: a classify teacher's soft targets (cached) into a smaller student (``runs/distill.py``)."""

from __future__ import annotations

from lmforge.commands.finetune import show
from lmforge.runs.config import DistillClassifyConfig


def run(cfg: DistillClassifyConfig) -> None:
    from lmforge.runs.distill import TASK, distill

    show(distill(cfg, progress=cfg.training.progress), TASK, cfg)
