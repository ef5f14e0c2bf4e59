"""Every task by name: the one dispatch table of lmforge (pretraining objectives and fine-tuning tasks).

``TASKS[name]`` says what the task is (``kind``: pretrain or finetune), where its class lives (imported
only when ``load()`` is called, so the table is torch-free and ``lmforge --help`` stays instant), which
model family it trains, and, for fine-tuning, which built-in corpora feed it (``data/builtin.py``'s
task names). ``runs/finetune.py``, ``runs/pretrain.py``, ``runs/run_dir.load_run``, the CLI and the
server all dispatch through it; adding a task means its task file, its line here and its tests (and,
for fine-tuning, its config in ``runs/config.py``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Literal

from lmforge.errors import UserError


@dataclass(frozen=True)
class TaskEntry:
    name: str
    kind: Literal["pretrain", "finetune"]
    cls: str
    """``module:Class`` of the task."""
    model: Literal["bert", "gpt", "seq2seq", "electra"]
    """The model family it trains."""
    builtin: str | None = None
    """The ``task`` of the built-in corpora that ``--data builtin:NAME`` accepts (fine-tuning)."""
    config: str | None = None
    """``module:Class`` of its command-line config (fine-tuning)."""
    whole_word: bool = False
    """Pretraining: mask whole words (the shards record word starts)."""
    use: str | None = None
    """How to use a finished run (``{out}`` is its directory), printed after fine-tuning."""
    saves_as: str | None = None
    """The task whose run this one writes, when another (distillation writes a classify or NER run)."""
    command: str | None = None
    """Its command when not ``finetune NAME``."""

    def load(self) -> type:
        module, _, name = self.cls.partition(":")
        return getattr(importlib.import_module(module), name)


TASKS: dict[str, TaskEntry] = {
    "mlm": TaskEntry("mlm", "pretrain", "lmforge.tasks.mlm:MLMTask", "bert"),
    "wwm-mlm": TaskEntry("wwm-mlm", "pretrain", "lmforge.tasks.mlm:MLMTask", "bert", whole_word=True),
    "electra": TaskEntry("electra", "pretrain", "lmforge.tasks.electra:ElectraTask", "electra"),
    "clm": TaskEntry("clm", "pretrain", "lmforge.tasks.clm:CLMTask", "gpt"),
    "classify": TaskEntry(
        "classify",
        "finetune",
        "lmforge.tasks.classification:ClassificationTask",
        "bert",
        builtin="classify",
        config="lmforge.runs.config:ClassifyConfig",
        use="lmforge predict --model {out} --input TEXTS --output OUT.jsonl",
    ),
    "distill-classify": TaskEntry(
        "distill-classify",
        "finetune",
        "lmforge.tasks.distill:DistilledClassification",
        "bert",
        builtin="classify",
        config="lmforge.runs.config:DistillClassifyConfig",
        use="lmforge predict --model {out} --input TEXTS --output OUT.jsonl",
        saves_as="classify",
        command="distill classify",
    ),
    "ner": TaskEntry(
        "ner",
        "finetune",
        "lmforge.tasks.ner:NERTask",
        "bert",
        builtin="ner",
        config="lmforge.runs.config:NERConfig",
        use="lmforge predict --model {out} --input TEXTS --output OUT.jsonl",
    ),
    "distill-ner": TaskEntry(
        "distill-ner",
        "finetune",
        "lmforge.tasks.distill:DistilledNER",
        "bert",
        builtin="ner",
        config="lmforge.runs.config:DistillNERConfig",
        use="lmforge predict --model {out} --input TEXTS --output OUT.jsonl",
        saves_as="ner",
        command="distill ner",
    ),
    "translate": TaskEntry(
        "translate",
        "finetune",
        "lmforge.tasks.translation:TranslationTask",
        "seq2seq",
        builtin="translate",
        config="lmforge.runs.config:TranslateTrainConfig",
        use="lmforge translate --model {out} --input TEXTS --output OUT.jsonl",
    ),
    "chat": TaskEntry(
        "chat",
        "finetune",
        "lmforge.tasks.dialogue:DialogueTask",
        "gpt",
        builtin="dialogue",
        config="lmforge.runs.config:ChatTrainConfig",
        use="lmforge chat --model {out}",
    ),
    "embed": TaskEntry(
        "embed",
        "finetune",
        "lmforge.tasks.embedding:EmbeddingTask",
        "bert",
        builtin="classify",
        config="lmforge.runs.config:EmbedTrainConfig",
        use="lmforge embed --model {out} --input TEXTS --output OUT",
    ),
}
FINETUNE_TASKS = tuple(name for name, entry in TASKS.items() if entry.kind == "finetune")


def task_entry(name: str, *, kind: str | None = None, where: str = "task") -> TaskEntry:
    """The entry of ``name``; a ValueError listing the valid names otherwise."""
    entry = TASKS.get(name)
    if entry is None or (kind is not None and entry.kind != kind):
        names = [n for n, e in TASKS.items() if kind is None or e.kind == kind]
        raise UserError(f"{where} {name!r} is not one of {', '.join(names)}")
    return entry
