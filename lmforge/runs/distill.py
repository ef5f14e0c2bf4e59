"""The distillation recipe (``lmforge distill classify|ner``): label the texts with the teacher once, then
fine-tune the student.

1. hold ``--out`` (``runs/session.locked``) and check the teacher before any work: a run of the same task
   whose labels (or tags) are the training data's;
2. the ``--augment`` variants of the training texts (TinyBERT's masked-LM character replacement, made once
   and kept in ``OUT/teacher/``), then the teacher's rows for every training, unlabelled and augmented
   text (``tasks/distill.py``: class logits per text, tag log-marginals per token), in chunks of ``CHUNK``
   texts written atomically to ``OUT/teacher/`` with a manifest naming the texts' SHA-256 and the teacher:
   a killed run keeps its finished chunks, and running it again resumes;
3. the one fine-tuning recipe (``runs/finetune.py``) with ``DistilledClassification`` or ``DistilledNER``,
   whose loss mixes the cached soft targets with the gold labels. The result is a normal classify / NER run.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from lmforge.errors import UserError
from lmforge.files import atomic_write, write_json
from lmforge.rundir import load_run, task_settings
from lmforge.rundir.layout import check_output_dir, is_training_run
from lmforge.runs.config import DistillClassifyConfig, DistillNERConfig
from lmforge.runs.finetune import finetune, load_splits
from lmforge.runs.results import FinetuneResult
from lmforge.runs.session import locked
from lmforge.tasks import TASKS, task_of_config
from lmforge.tasks.distill import CHUNK, MANIFEST, TEACHER_DIR, distill_examples, texts_digest

log = logging.getLogger("lmforge.distill")


def distill(cfg: DistillClassifyConfig | DistillNERConfig, *, progress: bool = True) -> FinetuneResult | None:
    """Label with the teacher (cached), then train the student; the result (None on other processes)."""
    name = task_of_config(cfg)
    entry = TASKS[name]
    task = entry.saves_as  # the task of the teacher and of the run written
    student_cls = entry.load()
    if not cfg.teacher:
        raise UserError(f"--teacher is required: a {task} run directory from `lmforge finetune {task}`")
    settings = task_settings(cfg.teacher)
    if settings is None or settings.get("task") != task:
        raise UserError(f"--teacher {cfg.teacher}: not a {task} run directory (from `lmforge finetune {task}`)")
    out = check_output_dir(cfg.out, inputs=[cfg.model, cfg.teacher], reusable=is_training_run)
    with locked(out):
        splits, _ = load_splits(cfg, TASKS[task])
        labels, key = student_cls.teacher_labels(splits["train"])
        if list(settings[key]) != labels:
            raise UserError(f"--teacher {cfg.teacher}: its {key} {settings[key]} are not the training data's {labels}")
        labelled, unlabelled = distill_examples(cfg.task_settings(), splits["train"], out)
        texts = [*labelled, *unlabelled]
        teacher_logits(cfg.teacher, texts, out / TEACHER_DIR, labels, rows=student_cls.teacher_rows, progress=progress)
        return finetune(cfg, name)


def teacher_logits(
    teacher_dir: str,
    texts: list[dict],
    directory: Path,
    labels: list[str],
    *,
    rows: Callable[[Any, list[dict]], list[np.ndarray]],
    progress: bool,
) -> None:
    """Write the teacher's rows for ``texts`` (``rows(run, chunk)``: the student task's ``teacher_rows``) to
    ``directory`` (chunk files + manifest), skipping the chunks a previous run finished; a cache for other texts or
    another teacher is refused, not mixed in."""
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
    run = load_run(teacher_dir)
    for n, i in enumerate(todo):
        found = rows(run, texts[i * CHUNK : (i + 1) * CHUNK])
        tensors = {
            "logits": torch.from_numpy(np.concatenate(found)).float().contiguous(),
            "rows": torch.tensor([len(r) for r in found], dtype=torch.int64),
        }
        target = directory / f"chunk-{i:05d}.safetensors"
        with atomic_write(target) as tmp:
            save_file(tensors, str(tmp))
        if progress:
            log.info(
                "teacher: %s / %s texts (%d/%d chunks)",
                f"{min((i + 1) * CHUNK, len(texts)):,}",
                f"{len(texts):,}",
                n + 1,
                len(todo),
            )
