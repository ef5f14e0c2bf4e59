"""The run directory: what a fine-tuning run writes, and ``load_run``, the one loader of trained runs.

```
RUN_DIR/config.json + model.safetensors   the trained model (a normal lmforge model directory: export works)
RUN_DIR/tokenizer.json ...                its tokenizer (source_tokenizer/ too when a translation's vocabularies differ)
RUN_DIR/head.safetensors                  a task head outside the model directory's model (classify, ner)
RUN_DIR/task.json                         the task's settings: what rebuilds the task (tasks/__init__.py TASKS)
RUN_DIR/config.yaml                       the recipe as run (``--resume RUN_DIR`` reads it)
RUN_DIR/results.json, report.md, *.png    what the run measured (runs/results.py)
RUN_DIR/checkpoints/, metrics.jsonl, .lock the loop's state (train/checkpoint.py, train/logging.py, runs/session.py)
```

``load_run(dir)`` reads ``task.json`` (a directory without one is a pretrained model: a BERT loads as
an embedder of first-token vectors, a GPT as a plain chat/generation model), rebuilds the task through
``TASKS``, loads the model and its head, and returns both in eval mode on the CPU. Reading touches only
JSON, safetensors and tokenizer files (nothing is unpickled). No training code is imported here: the
server loads runs through this module alone.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import nn

from lmforge.config import read_json_object, write_json
from lmforge.data.tokenizer import copy_tokenizer_files
from lmforge.errors import UserError
from lmforge.models.bert import Bert
from lmforge.models.gpt import GPT
from lmforge.models.registry import CONFIG_FILE, check_state, load_model, read_safetensors, save_model
from lmforge.tasks import task_entry

HEAD_FILE, TASK_FILE, RECIPE_FILE = "head.safetensors", "task.json", "config.yaml"


@dataclass
class Run:
    """A loaded run: its task name, the task, the model (eval mode, CPU) and whether it was fine-tuned."""

    name: str
    task: Any
    model: nn.Module
    directory: Path
    finetuned: bool


def write_run(run_dir: Path, task: Any, model: nn.Module, *, tokenizer_source: str | os.PathLike | None) -> None:
    """The trained model as a model directory, its head, ``task.json`` and (unless already there) the tokenizer."""
    base, head = task.split_model(model)
    save_model(base, run_dir)
    if head is not None:
        tmp = run_dir / (HEAD_FILE + ".tmp")
        save_file(head, str(tmp), metadata={"format": "pt"})
        tmp.replace(run_dir / HEAD_FILE)
    write_json(run_dir / TASK_FILE, task.settings())
    if tokenizer_source is not None and not (run_dir / "tokenizer.json").is_file():
        copy_tokenizer_files(tokenizer_source, run_dir)


def task_settings(run_dir: str | os.PathLike) -> dict | None:
    """The settings in ``run_dir/task.json``, or None when the directory has none (a pretrained model)."""
    path = Path(run_dir) / TASK_FILE
    return read_json_object(path, what="task file") if path.is_file() else None


def require_task(run_dir: str | os.PathLike, tasks: tuple[str, ...], *, command: str) -> str:
    """The task of the fine-tuned run ``run_dir``, checked (before any weights load) to be one of ``tasks``."""
    settings = task_settings(run_dir)
    name = None if settings is None else settings.get("task")
    if name not in tasks:
        what = "a pretrained model directory (no task.json)" if settings is None else f"a {name!r} run"
        raise UserError(
            f"{run_dir}: {command} takes a {' or '.join(tasks)} run from `lmforge finetune`; this is {what}"
        )
    return str(name)


def load_run(run_dir: str | os.PathLike, *, task: str | None = None) -> Run:
    """The task and model of ``run_dir``; ``task`` (when given) is the task the caller needs it to be."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).is_file():
        raise UserError(f"{run_dir}: not a model or run directory (no {CONFIG_FILE})")
    settings = task_settings(run_dir)
    finetuned = settings is not None
    base = load_model(run_dir)
    if settings is None:  # a pretrained model directory
        if not isinstance(base, (Bert, GPT)):
            raise UserError(f"{run_dir}: no {TASK_FILE}; pass a run directory written by `lmforge finetune`")
        name = "embed" if isinstance(base, Bert) else "chat"
        settings = {
            "task": name,
            "max_len": min(128, base.cfg.max_seq_len) if name == "embed" else base.cfg.max_seq_len,
        }
    name = settings.get("task")
    entry = task_entry(str(name), kind="finetune", where=f"{run_dir / TASK_FILE}: task")
    if task is not None and name != task:
        raise UserError(f"{run_dir}: a {name!r} run, not {task!r}; pass a run directory of `lmforge finetune {task}`")
    loaded = entry.load().from_settings(run_dir, settings)
    model = loaded.assemble(base)
    if model is not base:
        _load_head(run_dir, model, base)
    return Run(name, loaded, model.eval(), run_dir, finetuned)


def _load_head(run_dir: Path, model: nn.Module, base: nn.Module) -> None:
    expected = {k for k in model.state_dict() if not k.startswith("encoder.")}
    path = run_dir / HEAD_FILE
    if not path.is_file():
        raise UserError(f"{run_dir}: no {HEAD_FILE} (the task head that {TASK_FILE} names)")
    head = read_safetensors(path)
    if set(head) != expected:
        raise UserError(f"{path}: head tensors {sorted(head)} do not match {TASK_FILE} (expected {sorted(expected)})")
    encoder_state = {f"encoder.{k}": v for k, v in base.state_dict().items()}
    check_state(model, {**encoder_state, **head}, source=str(path))
    model.load_state_dict({**encoder_state, **head})
