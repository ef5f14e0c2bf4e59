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
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from lmforge.errors import UserError
from lmforge.files import atomic_write, write_json
from lmforge.runs.config import DistillClassifyConfig, DistillNERConfig
from lmforge.runs.finetune import finetune, load_splits
from lmforge.runs.results import FinetuneResult
from lmforge.runs.run_dir import load_run, task_settings
from lmforge.runs.session import locked
from lmforge.tasks.distill import CHUNK, MANIFEST, TEACHER_DIR, distill_examples, texts_digest

log = logging.getLogger("lmforge.distill")


def task_of(cfg: DistillClassifyConfig | DistillNERConfig) -> str:
    """The TASKS name of a distillation config: ``distill-ner`` or ``distill-classify``."""
    return "distill-ner" if isinstance(cfg, DistillNERConfig) else "distill-classify"


def distill(cfg: DistillClassifyConfig | DistillNERConfig, *, progress: bool = True) -> FinetuneResult | None:
    """Label with the teacher (cached), then train the student; the result (None on other processes)."""
    task = "ner" if isinstance(cfg, DistillNERConfig) else "classify"
    if not cfg.teacher:
        raise UserError(f"--teacher is required: a {task} run directory from `lmforge finetune {task}`")
    settings = task_settings(cfg.teacher)
    if settings is None or settings.get("task") != task:
        raise UserError(f"--teacher {cfg.teacher}: not a {task} run directory (from `lmforge finetune {task}`)")
    out = Path(cfg.out)
    with locked(out):
        splits, _ = load_splits(cfg, task)
        if task == "ner":
            from lmforge.tasks.ner import tag_set

            labels, key = tag_set(splits["train"]), "tags"
        else:
            from lmforge.tasks.classification import label_set

            labels, key = label_set(splits["train"]), "labels"
        if list(settings[key]) != labels:
            raise UserError(f"--teacher {cfg.teacher}: its {key} {settings[key]} are not the training data's {labels}")
        labelled, unlabelled = distill_examples(cfg, splits["train"], out)
        teacher_logits(cfg.teacher, [*labelled, *unlabelled], out / TEACHER_DIR, labels, progress=progress)
        return finetune(cfg, task_of(cfg))


def _teacher_rows(run, chunk: list[dict]) -> list[np.ndarray]:
    cpu = torch.device("cpu")
    if run.task.name == "ner":
        return run.task.tag_log_probs(run.model, chunk, device=cpu)
    return list(run.task.class_logits(run.model, chunk, device=cpu)[:, None, :])


def teacher_logits(teacher_dir: str, texts: list[dict], directory: Path, labels: list[str], *, progress: bool) -> None:
    """Write the teacher's rows for ``texts`` to ``directory`` (chunk files + manifest), skipping the chunks a
    previous run finished; a cache for other texts or another teacher is refused, not mixed in."""
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
        rows = _teacher_rows(run, texts[i * CHUNK : (i + 1) * CHUNK])
        tensors = {
            "logits": torch.from_numpy(np.concatenate(rows)).float().contiguous(),
            "rows": torch.tensor([len(r) for r in rows], dtype=torch.int64),
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
