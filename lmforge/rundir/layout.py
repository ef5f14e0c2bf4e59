"""The files of a run directory and what writes and checks them (the layout: ``lmforge/rundir/__init__.py``).

``write_run`` writes a trained model as a model directory, its head, ``task.json`` and the tokenizer;
``task_settings`` / ``task_name_of`` read what a directory is before any weights load, and
``require_capability`` refuses, naming the directory and the valid tasks, a run whose task lacks what a command
needs (``tasks.TASKS``' capabilities).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import nn

from lmforge.data.tokenizer import copy_tokenizer_files
from lmforge.errors import UserError
from lmforge.files import atomic_write, read_json_object, write_json
from lmforge.models.registry import CONFIG_FILE, model_type_of, read_config, save_model
from lmforge.tasks import TASKS, TaskEntry, opened_as, with_capability

HEAD_FILE, TASK_FILE, RECIPE_FILE, BACKEND_FILE = "head.safetensors", "task.json", "config.yaml", "backend.json"
RESULTS_FILE = "results.json"


def write_run(run_dir: Path, task: Any, model: nn.Module, *, tokenizer_source: str | os.PathLike | None) -> None:
    """The trained model as a model directory, its head, ``task.json`` and (unless already there) the tokenizer."""
    base, head = task.split_model(model)
    save_model(base, run_dir)
    if head is not None:
        with atomic_write(run_dir / HEAD_FILE) as tmp:
            save_file(head, str(tmp), metadata={"format": "pt"})
    write_json(run_dir / TASK_FILE, task.settings())
    if tokenizer_source is not None and not (run_dir / "tokenizer.json").is_file():
        copy_tokenizer_files(tokenizer_source, run_dir)


def task_settings(run_dir: str | os.PathLike) -> dict | None:
    """The settings in ``run_dir/task.json``, or None when the directory has none (a pretrained model)."""
    path = Path(run_dir) / TASK_FILE
    return read_json_object(path, what="task file") if path.is_file() else None


def model_family(run_dir: str | os.PathLike) -> str:
    """``bert``, ``gpt``, ``seq2seq`` or ``electra``: the family of the model directory's ``config.json``."""
    return model_type_of(read_config(run_dir))


def task_name_of(run_dir: str | os.PathLike) -> str:
    """The task ``run_dir`` loads as: its ``task.json``'s, or for a pretrained model directory the task its family
    opens as (``TaskEntry.opens_pretrained``). Reads JSON only."""
    if not (Path(run_dir) / CONFIG_FILE).is_file():
        raise UserError(f"{run_dir}: not a model or run directory (no {CONFIG_FILE})")
    settings = task_settings(run_dir)
    if settings is not None:
        return str(settings.get("task"))
    entry = opened_as(model_family(run_dir))
    if entry is None:
        raise UserError(f"{run_dir}: no {TASK_FILE}; pass a run directory written by `lmforge finetune`")
    return entry.name


def require_capability(run_dir: str | os.PathLike, capability: str, *, command: str) -> TaskEntry:
    """The TASKS entry of ``run_dir``'s task, checked (before any weights load) to have ``capability`` set."""
    name = task_name_of(run_dir)
    entry = TASKS.get(name)
    if entry is None or not getattr(entry, capability):
        *others, last = with_capability(capability)
        valid = f"{', '.join(others)} or {last}" if others else last
        what = "a pretrained model directory (no task.json)" if task_settings(run_dir) is None else f"a {name!r} run"
        raise UserError(f"{run_dir}: {command} takes a {valid} run; this is {what}")
    return entry
