"""The distillation recipe (``lmforge distill``): label the texts with the teacher once, then fine-tune the student.

1. hold ``--out`` (``runs/session.locked``) and check the teacher before any work: a classify run whose
   labels are the training data's;
2. the teacher's logits of every training text and every unlabelled text (``tasks/distill.py``), in
   chunks of ``CHUNK`` texts written atomically to ``OUT/teacher/`` with a manifest naming the texts'
   SHA-256 and the teacher: a killed run keeps its finished chunks, and running it again resumes;
3. the one fine-tuning recipe (``runs/finetune.py``) with ``DistilledClassification``, whose loss mixes
   the cached soft targets with the hard labels. The result is a normal classify run.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from lmforge.config import write_json
from lmforge.errors import UserError
from lmforge.runs.config import DistillClassifyConfig
from lmforge.runs.finetune import finetune, load_splits
from lmforge.runs.results import FinetuneResult
from lmforge.runs.run_dir import load_run, task_settings
from lmforge.runs.session import locked
from lmforge.tasks.classification import label_set
from lmforge.tasks.distill import CHUNK, MANIFEST, TEACHER_DIR, distill_examples, texts_digest

TASK = "distill-classify"
log = logging.getLogger("lmforge.distill")


def distill(cfg: DistillClassifyConfig, *, progress: bool = True) -> FinetuneResult | None:
    """Label with the teacher (cached), then train the student; the result (None on other processes)."""
    settings = task_settings(cfg.teacher)
    if settings is None or settings.get("task") != "classify":
        raise UserError(f"--teacher {cfg.teacher}: not a classify run directory (from `lmforge finetune classify`)")
    out = Path(cfg.out)
    with locked(out):
        splits, _ = load_splits(cfg, "classify")
        labels = label_set(splits["train"])
        if list(settings["labels"]) != labels:
            raise UserError(
                f"--teacher {cfg.teacher}: its labels {settings['labels']} are not the training data's {labels}"
            )
        labelled, unlabelled = distill_examples(cfg, splits["train"])
        teacher_logits(cfg.teacher, [*labelled, *unlabelled], out / TEACHER_DIR, labels, progress=progress)
        return finetune(cfg, TASK)


def teacher_logits(teacher_dir: str, texts: list[dict], directory: Path, labels: list[str], *, progress: bool) -> None:
    """Write the teacher's logits of ``texts`` to ``directory`` (chunk files + manifest), skipping the chunks
    a previous run finished; a cache for other texts or another teacher is refused, not mixed in."""
    manifest = {
        "teacher": str(Path(teacher_dir).resolve()),
        "labels": labels,
        "texts": len(texts),
        "texts_sha256": texts_digest(texts),
        "chunk_size": CHUNK,
        "chunks": (len(texts) + CHUNK - 1) // CHUNK,
    }
    path = directory / MANIFEST
    if path.is_file():
        found = json.loads(path.read_text(encoding="utf-8"))
        if found != manifest:
            changed = sorted(k for k in manifest if found.get(k) != manifest[k])
            raise UserError(f"{path}: cached teacher logits differ in {changed}; use a new --out")
    directory.mkdir(parents=True, exist_ok=True)
    write_json(path, manifest)
    todo = [i for i in range(manifest["chunks"]) if not (directory / f"chunk-{i:05d}.safetensors").is_file()]
    if not todo:
        return
    run = load_run(teacher_dir, task="classify")
    for n, i in enumerate(todo):
        chunk = texts[i * CHUNK : (i + 1) * CHUNK]
        logits = run.task.class_logits(run.model, chunk, device=torch.device("cpu"))
        target = directory / f"chunk-{i:05d}.safetensors"
        tmp = target.with_name(target.name + ".tmp")
        save_file({"logits": torch.from_numpy(logits).contiguous()}, str(tmp))
        os.replace(tmp, target)
        if progress:
            log.info(
                "teacher: %s / %s texts (%d/%d chunks)",
                f"{min((i + 1) * CHUNK, len(texts)):,}",
                f"{len(texts):,}",
                n + 1,
                len(todo),
            )
