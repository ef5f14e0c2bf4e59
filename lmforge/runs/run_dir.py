"""The run directory: what a fine-tuning run writes, and ``load_run``, the one loader of trained runs.

```
RUN_DIR/config.json + model.safetensors   the trained model (a normal lmforge model directory: export works)
RUN_DIR/tokenizer.json ...                its tokenizer (source_tokenizer/ too when a translation's vocabularies differ)
RUN_DIR/head.safetensors                  a task head outside the model directory's model (classify, ner)
RUN_DIR/task.json                         the task's settings: what rebuilds the task (tasks/__init__.py TASKS)
RUN_DIR/config.yaml                       the recipe as run (``--resume RUN_DIR`` reads it)
RUN_DIR/results.json, report.md, *.png    what the run measured (runs/results.py), explanations.* (classify, ner)
RUN_DIR/trainer_state/step-NNNNNNN/       checkpoints: weights, optimizer, RNG, data order (train/checkpoint.py)
RUN_DIR/metrics.jsonl, tb/, .lock         the loop's log, TensorBoard (train/logging.py), the lock (runs/session.py)
```

A compressed copy of a BERT run (``lmforge quantize``, ``lmforge export --to onnx``) holds the same
config.json, head, task.json and tokenizer, ``backend.json`` (written last: the copy is complete) and, in
place of model.safetensors, the encoder for its backend: ``model.int8.safetensors`` (inference/int8.py)
or ``encoder.onnx`` (inference/onnx.py). ``load_run`` reads it like any run, so ``predict``,
``evaluate`` and ``serve`` take it unchanged.

``load_run(dir)`` reads ``task.json`` (a directory without one is a pretrained model: a BERT loads as
an embedder of first-token vectors, a GPT as a plain chat/generation model), rebuilds the task through
``TASKS``, loads the model and its head, and returns both in eval mode on the CPU. Reading touches only
JSON, safetensors and tokenizer files (nothing is unpickled). No training code is imported here: the
server loads runs through this module alone.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import nn

from lmforge.data.tokenizer import TOKENIZER_FILES, copy_tokenizer_files
from lmforge.errors import UserError
from lmforge.files import read_json_object, write_json
from lmforge.models.bert import BertConfig
from lmforge.models.gpt import GPTConfig
from lmforge.models.registry import CONFIG_FILE, load_model, read_safetensors, save_model
from lmforge.tasks import task_entry

HEAD_FILE, TASK_FILE, RECIPE_FILE, BACKEND_FILE = "head.safetensors", "task.json", "config.yaml", "backend.json"
BACKENDS = ("int8", "onnx")
COMPRESSIBLE = ("classify", "ner", "embed")


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


def backend_of(run_dir: str | os.PathLike) -> dict | None:
    """``backend.json`` of a compressed copy, checked, or None for a PyTorch fp32 directory."""
    path = Path(run_dir) / BACKEND_FILE
    if not path.is_file():
        return None
    backend = read_json_object(path, what="backend file")
    if backend.get("backend") not in BACKENDS:
        raise UserError(f"{path}: backend={backend.get('backend')!r} is not one of {list(BACKENDS)}")
    return backend


def load_base(run_dir: str | os.PathLike) -> nn.Module:
    """The model of a model or run directory for its backend: PyTorch fp32, int8, or ONNX Runtime."""
    backend = backend_of(run_dir)
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
    settings = task_settings(run_dir)
    finetuned = settings is not None
    base = load_base(run_dir)
    if settings is None:  # a pretrained model directory
        if not isinstance(base.cfg, (BertConfig, GPTConfig)):
            raise UserError(f"{run_dir}: no {TASK_FILE}; pass a run directory written by `lmforge finetune`")
        name = "embed" if isinstance(base.cfg, BertConfig) else "chat"
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
        _load_head(run_dir, model)
    return Run(name, loaded, model.eval(), run_dir, finetuned)


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


_COPY_FILES = {CONFIG_FILE, TASK_FILE, HEAD_FILE, BACKEND_FILE, "model.int8.safetensors", "encoder.onnx"}


def _part_of_a_copy(name: str) -> bool:
    return name in _COPY_FILES or name in TOKENIZER_FILES or ".tmp" in name


def write_compressed(
    source: str | os.PathLike, out: str | os.PathLike, backend: dict, write_encoder: Callable[[Path], dict]
) -> Path:
    """A copy of the BERT run (or pretrained BERT directory) ``source`` in ``out`` for another backend:
    config.json, the tokenizer, task.json and head.safetensors copied, the encoder written by
    ``write_encoder(out)`` (which returns more backend.json fields), then backend.json. Checked before any
    work: the source is an fp32 run of a task that has an encoder to compress, and ``out`` is new, empty,
    or an earlier compressed copy (a training run there is never overwritten)."""
    source, out = Path(source), Path(out)
    if not (source / CONFIG_FILE).is_file():
        raise UserError(f"--model {source}: not a model or run directory (no {CONFIG_FILE})")
    earlier = backend_of(source)
    if earlier is not None:
        raise UserError(f"--model {source}: already a {earlier['backend']} copy; pass the fp32 run it came from")
    settings = task_settings(source)
    name = "embed" if settings is None else settings.get("task")
    if name not in COMPRESSIBLE:
        raise UserError(f"{source}: a {name!r} run; {backend['backend']} takes {', '.join(COMPRESSIBLE)} runs")
    if out.resolve() == source.resolve():
        raise UserError(f"--out {out}: the source directory itself; write the copy to a new directory")
    if out.exists() and backend_of(out) is None:
        foreign = sorted(p.name for p in out.iterdir() if not _part_of_a_copy(p.name))
        if foreign:  # an interrupted copy holds only the copy's own files: it may be written again
            raise UserError(
                f"--out {out}: exists and is not a compressed copy (it holds {foreign[:3]}); choose a new one"
            )
    out.mkdir(parents=True, exist_ok=True)
    (out / BACKEND_FILE).unlink(missing_ok=True)  # an unfinished copy has none
    for stale in ("model.safetensors", "model.int8.safetensors", "encoder.onnx"):
        (out / stale).unlink(missing_ok=True)
    for file in (CONFIG_FILE, TASK_FILE, HEAD_FILE):
        if (source / file).is_file():
            shutil.copyfile(source / file, out / file)
    copy_tokenizer_files(source, out)
    more = write_encoder(out)
    write_json(out / BACKEND_FILE, {**backend, **more, "source": str(source)})
    return out
