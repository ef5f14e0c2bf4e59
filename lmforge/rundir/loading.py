"""``load_run``: the one loader of model and run directories (fp32, int8 and ONNX copies alike).

``load_run(dir)`` finds the task (``layout.task_name_of``: ``task.json``, or the task a pretrained model's family
opens as), rebuilds it through ``TASKS`` (``from_settings``, or ``OpensPretrained.pretrained_settings`` for a
model directory), loads the model for the directory's backend and its head, and returns a ``Run`` in eval mode
on the CPU. Reading touches only JSON, safetensors, ONNX and tokenizer files (nothing is unpickled).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from lmforge.errors import UserError
from lmforge.files import read_json_object
from lmforge.models.registry import CONFIG_FILE, load_model, read_safetensors
from lmforge.rundir.layout import BACKEND_FILE, HEAD_FILE, TASK_FILE, task_name_of, task_settings
from lmforge.tasks import task_entry
from lmforge.tasks.base import OpensPretrained

BACKENDS = ("int8", "onnx")


@dataclass
class Run:
    """A loaded run: its task's name, the task, the model (eval mode, CPU), where it was read from, whether it
    was fine-tuned (False: a pretrained model directory), and ``backend.json`` of a compressed copy (None: the
    PyTorch fp32 model)."""

    task_name: str
    task: Any
    model: nn.Module
    directory: Path
    finetuned: bool
    backend: dict | None = None


def backend_of(run_dir: str | os.PathLike) -> dict | None:
    """``backend.json`` of a compressed copy, checked, or None for a PyTorch fp32 directory."""
    path = Path(run_dir) / BACKEND_FILE
    if not path.is_file():
        return None
    backend = read_json_object(path, what="backend file")
    if backend.get("backend") not in BACKENDS:
        raise UserError(f"{path}: backend={backend.get('backend')!r} is not one of {list(BACKENDS)}")
    return backend


def load_base(run_dir: str | os.PathLike, backend: dict | None = None) -> nn.Module:
    """The model of a model or run directory for its backend (``backend_of(run_dir)`` unless given): PyTorch fp32,
    int8, or ONNX Runtime."""
    backend = backend if backend is not None else backend_of(run_dir)
    if backend is None:
        return load_model(run_dir)
    if backend["backend"] == "int8":
        from lmforge.inference.int8 import load_int8

        return load_int8(run_dir, list(backend.get("quantized", [])))
    from lmforge.inference.onnx import load_onnx

    return load_onnx(run_dir)


def load_run(run_dir: str | os.PathLike, *, task: str | None = None) -> Run:
    """The task and model of ``run_dir``; ``task`` (when given) is the task the caller needs it to be."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).is_file():
        raise UserError(f"{run_dir}: not a model or run directory (no {CONFIG_FILE})")
    name = task_name_of(run_dir)
    entry = task_entry(name, kind="finetune", where=f"{run_dir / TASK_FILE}: task")
    if task is not None and name != task:
        raise UserError(f"{run_dir}: a {name!r} run, not {task!r}; pass a run directory of `lmforge finetune {task}`")
    saved, backend = task_settings(run_dir), backend_of(run_dir)
    base = load_base(run_dir, backend)
    task_cls = entry.load()
    if saved is None:  # a pretrained model directory, opened as the task its family declares
        assert issubclass(task_cls, OpensPretrained), f"{entry.cls} opens pretrained models"
    settings = saved if saved is not None else task_cls.pretrained_settings(base.cfg)
    loaded = task_cls.from_settings(run_dir, settings)
    model = loaded.assemble(base)
    if model is not base:
        _load_head(run_dir, model)
    return Run(name, loaded, model.eval(), run_dir, finetuned=saved is not None, backend=backend)


def _load_head(run_dir: Path, model: nn.Module) -> None:
    """The head tensors (everything outside ``model.encoder``) from head.safetensors, checked by name and shape."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith("encoder.")}
    path = run_dir / HEAD_FILE
    if not path.is_file():
        raise UserError(f"{run_dir}: no {HEAD_FILE} (the task head that {TASK_FILE} names)")
    head = read_safetensors(path)
    if set(head) != set(expected):
        raise UserError(f"{path}: head tensors {sorted(head)} do not match {TASK_FILE} (expected {sorted(expected)})")
    shapes = {k: tuple(v.shape) for k, v in head.items()}
    misshaped = [f"{k}: file {shape} vs {expected[k]}" for k, shape in shapes.items() if shape != expected[k]]
    if misshaped:
        raise UserError(f"{path}: mis-shaped head tensors: {'; '.join(misshaped)}")
    for name, child in model.named_children():  # the encoder's own loading is left alone (it may be int8)
        if name != "encoder":
            child.load_state_dict({k.removeprefix(f"{name}."): v for k, v in head.items() if k.startswith(f"{name}.")})
