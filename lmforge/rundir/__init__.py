"""The run directory: what a fine-tuning run writes and how every command, the server and the explainer read it.

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
JSON, safetensors and tokenizer files (nothing is unpickled). No training code and no recipe is
imported here: the server, the commands and the explainer load runs through this package alone.

- ``layout.py``: the file names, ``write_run``, ``task_settings``, ``task_name_of``, ``require_capability``, and
  where a command may write (``check_output_dir``, ``check_output_files``: never over an input, a model or a run);
- ``loading.py``: ``Run`` (its task name, task, model, directory, whether fine-tuned, its backend), ``load_run``,
  ``load_base``, ``backend_of``;
- ``compressed.py``: ``write_compressed``, the int8 / ONNX copies.
"""

from lmforge.rundir.layout import (
    BACKEND_FILE,
    HEAD_FILE,
    RECIPE_FILE,
    RESULTS_FILE,
    TASK_FILE,
    require_capability,
    task_name_of,
    task_settings,
    write_run,
)
from lmforge.rundir.loading import BACKENDS, Run, backend_of, load_base, load_run

__all__ = [
    "BACKENDS",
    "BACKEND_FILE",
    "HEAD_FILE",
    "RECIPE_FILE",
    "RESULTS_FILE",
    "TASK_FILE",
    "Run",
    "backend_of",
    "load_base",
    "load_run",
    "require_capability",
    "task_name_of",
    "task_settings",
    "write_run",
]
