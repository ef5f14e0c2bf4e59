"""The files of a run directory and what writes and checks them (the layout: ``lmforge/rundir/__init__.py``).

``write_run`` writes a trained model as a model directory, its head, ``task.json`` and the tokenizer;
``task_settings`` / ``task_name_of`` read what a directory is before any weights load, and
``require_capability`` refuses, naming the directory and the valid tasks, a run whose task lacks what a command
needs (``tasks.TASKS``' capabilities).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import nn

from lmforge.data.readers import check_output_file
from lmforge.data.tokenizer import copy_tokenizer_files
from lmforge.errors import UserError
from lmforge.files import atomic_write, read_json_object, read_yaml, write_json
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


# --- where a command may write ------------------------------------------------------------------------------
# One rule for every command that writes: into a new (or empty) directory, into its own kind of directory (its
# run, an earlier output of the same command), or to file paths that are not its inputs, not inside a model or
# run directory, and not each other. Refusals come before any work and say what is there.
MODEL_MARKERS = (TASK_FILE, RECIPE_FILE, CONFIG_FILE, BACKEND_FILE, "trainer_state", "model.safetensors")


def holds_model(directory: Path) -> str | None:
    """What makes ``directory`` a model or run directory (for refusals), or None."""
    if not directory.is_dir():
        return None
    if (directory / TASK_FILE).is_file():
        return f"a {task_settings(directory).get('task')!r} run"
    if (directory / RECIPE_FILE).is_file() or (directory / "trainer_state").is_dir():
        return "a training run"
    found = next((m for m in MODEL_MARKERS if (directory / m).exists()), None)
    return None if found is None else f"a model directory ({found})"


def is_training_run(directory: Path) -> bool:
    """A directory a training command wrote (its recipe is there): the checkpoint check decides what happens."""
    return (directory / RECIPE_FILE).is_file()


def is_plain_model(directory: Path) -> bool:
    """A lmforge model directory with nothing of a run: what ``lmforge convert`` writes."""
    run_files = (TASK_FILE, RECIPE_FILE, BACKEND_FILE, "trainer_state")
    return (directory / CONFIG_FILE).is_file() and not any((directory / f).exists() for f in run_files)


def holds_stages_of(config_type: type) -> Callable[[Path], bool]:
    """Whether a directory is a multi-stage command's own ``--out`` (demo, compare, nas: run directories inside):
    no model or run file at its top but a recipe whose keys are all fields of ``config_type`` (the command's
    config), so a rerun may reuse it and another command may not write there."""
    names = {f.name for f in dataclasses.fields(config_type)}

    def reusable(directory: Path) -> bool:
        if any((directory / m).exists() for m in MODEL_MARKERS if m != RECIPE_FILE):
            return False
        try:
            recipe = read_yaml(directory / RECIPE_FILE)
        except UserError:
            return False
        return isinstance(recipe, dict) and set(recipe) <= names

    return reusable


def check_output_dir(
    out: str | os.PathLike,
    *,
    inputs: Sequence[str | os.PathLike | None] = (),
    flag: str = "--out",
    reusable: Callable[[Path], bool] | None = None,
) -> Path:
    """``out`` may be written: not a file, not one of ``inputs`` (nor a directory holding one), and when it already
    holds a model or a run, one that ``reusable`` accepts (this command's own kind of output)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{flag} {out}: is a file; name a directory to write")
    for given in inputs:
        if given is None or not Path(given).exists():
            continue
        source = Path(given).resolve()
        if out.resolve() == source or out.resolve() in source.parents:
            raise UserError(
                f"{flag} {out}: holds the input {given}; writing there would replace it. Choose a new directory"
            )
    what = holds_model(out)
    if what is not None and not (reusable is not None and reusable(out)):
        raise UserError(f"{flag} {out}: already holds {what}; writing there would replace it. Choose a new directory")
    return out


def check_output_files(
    outputs: Sequence[str | os.PathLike], *, inputs: Sequence[str | os.PathLike] = (), flag: str = "--output"
) -> list[Path]:
    """The files a command writes (its main output first, then what it writes beside it): none a directory or an
    input (``data.readers.check_output_file``), none inside a model or run directory, no two the same."""
    paths = [check_output_file(p, inputs=inputs, flag=flag) for p in outputs]
    main = paths[0]
    for other in paths[1:]:
        if other.resolve() == main.resolve():
            raise UserError(
                f"{flag} {main}: the command also writes {other.suffix} file beside it, at this very path; "
                f"name the main output with another extension (e.g. {main.with_suffix('.jsonl').name})"
            )
    for path in paths:
        run = next((d for d in (path.parent, *path.parent.parents) if holds_model(d)), None)
        if run is not None:
            raise UserError(
                f"{flag} {path}: inside {run}, which holds {holds_model(run)}; write outside model and run directories"
            )
    return paths
