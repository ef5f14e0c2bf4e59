"""Every task by name, with what it can do: the one dispatch table of lmforge.

``TASKS[name]`` says what the task is (``kind``: pretrain or finetune), where its class lives (imported
only when ``load()`` is called, so the table is torch-free and ``lmforge --help`` stays instant), which
model family it trains, and, for fine-tuning, which built-in corpora feed it (``data/builtin.py``), its
command-line config and command, and its **capabilities**: the HTTP route that serves it (``serve/``), how
it is explained (``explain/``), whether an int8 / ONNX copy can hold it (``rundir/compressed.py``), the files
``evaluate`` and ``predict`` read, whether ``nas`` searches for it, and which pretrained model family a model
directory without ``task.json`` opens as (``rundir/loading.py``). The CLI's per-task commands are generated
from this table (``cli.py``), and the recipes, the server, the run loader and the explainer dispatch through
it: outside ``lmforge/tasks/`` nothing compares task names (``tests/layout_census.py`` counts).

Behaviour the task class owns is declared by the protocols of ``tasks/base.py`` (checked with
``isinstance``). Adding a task: docs/ARCHITECTURE.md "How to add a task".
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Literal

from lmforge.errors import UserError

FINETUNE_RUNNER = "lmforge.commands.finetune:run"
DISTILL_RUNNER = "lmforge.commands.distill:run"
ALL_METHODS = ("ig", "grad-x-input", "occlusion", "attention")
"""The attribution methods of ``explain/attribution.py``."""


def resolve(target: str) -> Any:
    """The object named by ``"module:name"`` (imported now)."""
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class FileFormat:
    """The labelled files of a task: how ``evaluate`` (and fine-tuning from files) reads them, how recipes write
    a corpus's splits for it."""

    reader: str
    """``module:function`` ``read(path, *, skip_bad_rows) -> (examples, ReadReport)``."""
    writer: str
    """``module:function`` ``write(path, examples) -> rows``."""
    suffix: str


LABELLED = FileFormat("lmforge.data.readers:read_labelled", "lmforge.data.readers:write_jsonl", ".jsonl")
TAGGED = FileFormat("lmforge.data.readers:read_tagged", "lmforge.data.readers:write_conll", ".conll")


@dataclass(frozen=True)
class Explaining:
    """How ``lmforge explain``, ``POST /v1/explain`` and the fine-tuning report explain a task's runs."""

    explainer: str
    """``module:function`` ``(run, example, *, method, steps, [label], [baseline]) -> [Explanation]``."""
    inputs: Literal["text", "pair", "text-or-pair"] = "text"
    """What one input is: a text, a (text, text_pair) pair, or either."""
    methods: tuple[str, ...] = ALL_METHODS
    """The methods it supports (occlusion needs a [MASK] token, which decoders lack)."""
    label: bool = False
    """``--label`` chooses the class explained (the explainer takes ``label``)."""
    baselines: bool = True
    """``--baseline pad|mask`` chooses Integrated Gradients' baseline (the explainer takes ``baseline``); decoders
    have no [MASK] and always use [PAD] (or the end token)."""
    in_report: bool = False
    """A fine-tune's report.md explains its first correct and wrong test examples (``explain/report.py``)."""


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
    """Its command (fine-tuning): ``finetune NAME`` unless given."""
    summary: str = ""
    """Its command's one-line help (fine-tuning)."""
    runner: str = FINETUNE_RUNNER
    """``module:function`` its command runs (fine-tuning)."""
    # --- capabilities ---------------------------------------------------------------------------------
    route: str | None = None
    """The HTTP route that serves its runs (``serve/app.py``); None: not served."""
    explaining: Explaining | None = None
    """How its runs are explained; None: not explained."""
    compressible: bool = False
    """An int8 or ONNX copy can hold its run (a BERT encoder plus a PyTorch head)."""
    files: FileFormat | None = None
    """Its labelled files: ``lmforge evaluate`` scores a run on them; None: not evaluated from files."""
    predicts: bool = False
    """``lmforge predict`` writes its predictions for a file of texts."""
    searchable: bool = False
    """``lmforge nas`` searches encoders for it (the class implements ``Searchable``)."""
    opens_pretrained: Literal["bert", "gpt"] | None = None
    """A pretrained model directory of this family (no task.json) loads as this task (``OpensPretrained``)."""
    language_model: bool = False
    """Its runs are decoders with their vocabulary head: ``lmforge evaluate --task`` scores them on perplexity,
    multiple-choice and generation tasks (``evals/``), and its fine-tuned runs count as chat models there."""
    translator: bool = False
    """Its runs are encoder-decoders translating ``src`` into ``tgt``: ``lmforge evaluate --task`` scores them on
    the translation tasks in their direction (a reference's log-likelihood among candidates, greedy translations
    against references; ``evals/``)."""

    def load(self) -> type:
        return resolve(self.cls)

    def load_config(self) -> type:
        """Its command-line config class (fine-tuning)."""
        if self.config is None:
            raise UserError(f"task {self.name!r} has no command-line config")
        return resolve(self.config)

    @property
    def command_name(self) -> str:
        return self.command or f"finetune {self.name}"


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
        summary="Fine-tune a BERT or a decoder (GPT, SmolLM2, Gemma 3) for text or text-pair classification",
        route="/v1/classify",
        explaining=Explaining(
            "lmforge.explain.targets:explain_classification", inputs="text-or-pair", label=True, in_report=True
        ),
        compressible=True,
        files=LABELLED,
        predicts=True,
        searchable=True,
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
        summary="Distil a fine-tuned classify run (teacher) into a smaller BERT (student)",
        runner=DISTILL_RUNNER,
    ),
    "ner": TaskEntry(
        "ner",
        "finetune",
        "lmforge.tasks.ner:NERTask",
        "bert",
        builtin="ner",
        config="lmforge.runs.config:NERConfig",
        use="lmforge predict --model {out} --input TEXTS --output OUT.jsonl",
        summary="Fine-tune a BERT for named-entity recognition",
        route="/v1/ner",
        explaining=Explaining("lmforge.explain.targets:explain_entities", in_report=True),
        compressible=True,
        files=TAGGED,
        predicts=True,
        searchable=True,
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
        summary="Distil a fine-tuned NER run (teacher) into a smaller BERT (student)",
        runner=DISTILL_RUNNER,
    ),
    "translate": TaskEntry(
        "translate",
        "finetune",
        "lmforge.tasks.translation:TranslationTask",
        "seq2seq",
        builtin="translate",
        config="lmforge.runs.config:TranslateTrainConfig",
        use="lmforge translate --model {out} --input TEXTS --output OUT.jsonl",
        summary="Train a Transformer encoder-decoder for translation",
        route="/v1/translate",
        translator=True,
        explaining=Explaining(
            "lmforge.explain.targets:explain_translation", methods=("ig", "grad-x-input", "attention"), baselines=False
        ),
    ),
    "chat": TaskEntry(
        "chat",
        "finetune",
        "lmforge.tasks.dialogue:DialogueTask",
        "gpt",
        builtin="dialogue",
        config="lmforge.runs.config:ChatTrainConfig",
        use="lmforge chat --model {out}",
        summary="Fine-tune a GPT on conversations (loss on assistant turns)",
        route="/v1/chat/completions",
        explaining=Explaining(
            "lmforge.explain.targets:explain_continuation", methods=("ig", "grad-x-input", "attention"), baselines=False
        ),
        opens_pretrained="gpt",
        language_model=True,
    ),
    "dpo": TaskEntry(
        "dpo",
        "finetune",
        "lmforge.tasks.preference:DPOTask",
        "gpt",
        config="lmforge.runs.config:DPOConfig",
        use="lmforge chat --model {out}",
        saves_as="chat",
        summary="Preference-tune a GPT with DPO on pairs of replies (reference log-probabilities cached)",
    ),
    "orpo": TaskEntry(
        "orpo",
        "finetune",
        "lmforge.tasks.preference:ORPOTask",
        "gpt",
        config="lmforge.runs.config:ORPOConfig",
        use="lmforge chat --model {out}",
        saves_as="chat",
        summary="Preference-tune a GPT with ORPO (SFT and an odds-ratio penalty in one stage, no reference)",
    ),
    "embed": TaskEntry(
        "embed",
        "finetune",
        "lmforge.tasks.embedding:EmbeddingTask",
        "bert",
        builtin="classify",
        config="lmforge.runs.config:EmbedTrainConfig",
        use="lmforge embed --model {out} --input TEXTS --output OUT",
        summary="Fine-tune a BERT into a sentence embedder with SimCSE",
        route="/v1/embeddings",
        explaining=Explaining("lmforge.explain.targets:explain_similarity", inputs="pair"),
        compressible=True,
        opens_pretrained="bert",
    ),
}
FINETUNE_TASKS = tuple(name for name, entry in TASKS.items() if entry.kind == "finetune")
PRETRAIN_TASKS = tuple(name for name, entry in TASKS.items() if entry.kind == "pretrain")
SEARCH_TASKS = tuple(name for name, entry in TASKS.items() if entry.searchable)


def with_capability(capability: str) -> list[str]:
    """The names of the tasks whose ``capability`` field is set (for error messages: what would be valid)."""
    return [name for name, entry in TASKS.items() if getattr(entry, capability)]


def opened_as(family: str) -> TaskEntry | None:
    """The task a pretrained model directory of ``family`` (``bert``, ``gpt``) opens as, or None."""
    return next((e for e in TASKS.values() if e.opens_pretrained == family), None)


def task_of_config(cfg: Any) -> str:
    """The task whose command-line config ``cfg`` is an instance of."""
    name = f"{type(cfg).__module__}:{type(cfg).__name__}"
    found = next((n for n, e in TASKS.items() if e.config == name), None)
    if found is None:
        raise UserError(f"{type(cfg).__name__} is the config of no task")
    return found


def task_entry(name: str, *, kind: str | None = None, where: str = "task") -> TaskEntry:
    """The entry of ``name``; a ValueError listing the valid names otherwise."""
    entry = TASKS.get(name)
    if entry is None or (kind is not None and entry.kind != kind):
        names = [n for n, e in TASKS.items() if kind is None or e.kind == kind]
        raise UserError(f"{where} {name!r} is not one of {', '.join(names)}")
    return entry
