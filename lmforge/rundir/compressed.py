"""Compressed copies of a run (``lmforge quantize``, ``lmforge export --to onnx``): the same config.json, head,
task.json and tokenizer, the encoder for another backend, and ``backend.json`` written last (the copy is
complete). Only runs whose task is ``compressible`` (``tasks.TASKS``: a BERT encoder plus a PyTorch head) and
pretrained BERT directories are copied."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from lmforge.data.tokenizer import TOKENIZER_FILES, copy_tokenizer_files
from lmforge.errors import UserError
from lmforge.files import write_json
from lmforge.models.registry import CONFIG_FILE
from lmforge.rundir.layout import BACKEND_FILE, HEAD_FILE, TASK_FILE, model_family, require_capability
from lmforge.rundir.loading import backend_of

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
    require_capability(source, "compressible", command=f"an {backend['backend']} copy")
    if model_family(source) != "bert":
        raise UserError(
            f"--model {source}: an {backend['backend']} copy holds a BERT encoder; this run's model is a "
            f"{model_family(source)} (for a decoder: lmforge export --to gguf --quant q8_0)"
        )
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
