"""The ``lmforge finetune classify|ner``, ``lmforge evaluate`` and ``lmforge predict`` commands.

``finetune`` loads a pretrained lmforge BERT directory (or only its config and tokenizer, with
``--init scratch``), puts the task's head on it, trains through ``train.loop.fit`` with early
stopping on the dev metric, and writes the best checkpoint as a run directory that is also a
model directory:

```
RUN_DIR/config.json + model.safetensors   the fine-tuned encoder (a normal lmforge BERT: export works)
RUN_DIR/head.safetensors + task.json      the task head and what rebuilds the task (labels / tags, window)
RUN_DIR/results.json                      dev and test metrics with their definitions, data report, training
RUN_DIR/report.md, loss.png, confusion.png what a person reads
```

``evaluate`` and ``predict`` rebuild the task from ``task.json`` and run its ``evaluate`` /
``predict``; nothing about the task is guessed from file names.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save_file
from torch import nn

from lmforge.config import check_range, read_json_object, write_json, write_yaml
from lmforge.data.builtin import BUILTINS, load_builtin
from lmforge.data.readers import ReadReport, check_output_file, read_labelled, read_tagged, write_jsonl
from lmforge.data.tokenizer import LMTokenizer, copy_tokenizer_files, load_tokenizer
from lmforge.metrics import DEFINITIONS, plot_confusion
from lmforge.models.bert import Bert, BertConfig, Pooler
from lmforge.models.registry import WEIGHTS_FILE, check_state, read_config, read_safetensors, save_model
from lmforge.tasks.classification import ClassificationTask, label_set
from lmforge.tasks.ner import NERTask, tag_set
from lmforge.train import checkpoint
from lmforge.train.config import TrainConfig
from lmforge.train.loop import fit
from lmforge.train.optim import OptimConfig
from lmforge.train.rundir import run_session

HEAD_FILE, TASK_FILE = "head.safetensors", "task.json"


def _finetune_training() -> TrainConfig:
    return TrainConfig(
        global_batch_size=32, micro_batch_size=32, eval_every=200, save_every=200, log_every=20, patience=5,
        optim=OptimConfig(lr=1e-4, warmup_steps=100, schedule="linear", min_lr_ratio=0.0, weight_decay=0.01),
    )  # fmt: skip


@dataclass
class FinetuneConfig:
    """What every fine-tuning task takes."""

    out: str
    """Run directory."""
    model: str
    """Pretrained lmforge BERT directory (config.json + model.safetensors + tokenizer)."""
    data: str | None = None
    """builtin:NAME instead of --train/--dev/--test (see `lmforge data list`)."""
    train: str | None = None
    """Training file."""
    dev: str | None = None
    """Dev file for early stopping; without one, 10% of --train (fixed seed) is held out."""
    test: str | None = None
    """Test file, evaluated once with the best checkpoint."""
    skip_bad_rows: bool = False
    """Skip malformed rows / sentences (reported with file:line) instead of stopping at the first."""
    init: Literal["pretrained", "scratch"] = "pretrained"
    """pretrained weights, or random initialisation of the same architecture (what pretraining buys)."""
    max_len: int | None = None
    """Longest input in sub-tokens, with [CLS] and [SEP]; None = min(128, the model's max_seq_len)."""
    epochs: float = 3.0
    """Training epochs (sets training.max_steps); 0 = use training.max_steps."""
    dropout: float | None = None
    """Encoder and head dropout; None keeps the pretrained model's."""
    training: TrainConfig = field(default_factory=_finetune_training)
    resume: str | None = None
    """Continue the run in this directory from its last checkpoint."""

    def __post_init__(self) -> None:
        check_range("epochs", self.epochs, at_least=0)
        check_range("max_len", self.max_len, at_least=3)  # [CLS], at least one token, [SEP]
        check_range("dropout", self.dropout, at_least=0, below=1)


@dataclass
class ClassifyConfig(FinetuneConfig):
    """Fine-tune a BERT for text or text-pair classification (CSV / TSV / JSONL: text, text_pair, label)."""

    pooling: Literal["cls", "pooler", "mean"] = "pooler"
    """Sentence representation: first token, first token through dense + tanh, or mean of tokens."""
    selection: Literal["accuracy", "macro_f1"] = "accuracy"
    """Dev metric for early stopping and best-checkpoint selection."""


@dataclass
class NERConfig(FinetuneConfig):
    """Fine-tune a BERT for named-entity recognition (CoNLL or JSONL tokens/tags, BIO or BIOES)."""

    head: Literal["crf", "softmax"] = "crf"
    """Tag decoder: linear-chain CRF (Viterbi) or independent softmax per token."""
    overlap: int | None = None
    """Sub-tokens shared by consecutive windows of sentences longer than max_len; None = max_len // 4."""


def training_for_epochs(training: TrainConfig, epochs: float, n_items: int) -> TrainConfig:
    """``training`` with max_steps set to cover ``epochs`` passes over ``n_items``; unchanged when epochs is 0."""
    if epochs <= 0:
        return training
    return dataclasses.replace(training, max_steps=max(1, math.ceil(epochs * n_items / training.global_batch_size)))


def split_off_dev(train: list[dict], seed: int) -> tuple[list[dict], list[dict]]:
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    cut = max(1, len(train) // 10)
    dev = {*order[:cut]}
    return [ex for i, ex in enumerate(train) if i not in dev], [train[i] for i in sorted(dev)]


def load_splits(
    cfg, kind: str, read: Callable[..., tuple[list[dict], ReadReport]] | None = None, *, builtin_path: str | None = None
) -> tuple[dict[str, list[dict]], list[ReadReport]]:
    """train / dev / test examples from --data builtin:NAME or the files, and what reading skipped.

    ``cfg`` needs ``data``, ``train``, ``dev``, ``test``, ``skip_bad_rows`` and ``training.seed``;
    ``kind`` is the built-in corpora's task (classify, ner, dialogue, translate); ``read(path,
    skip_bad_rows=...)`` reads one file (default: the classify / ner readers). Without a dev file,
    10% of train (fixed seed) is held out.
    """
    if cfg.data:
        name = cfg.data.removeprefix("builtin:")
        if not cfg.data.startswith("builtin:") or name not in BUILTINS or BUILTINS[name].task != kind:
            names = [f"builtin:{n}" for n, b in BUILTINS.items() if b.task == kind]
            raise ValueError(f"--data {cfg.data!r}: expected one of {', '.join(names)} (or --train/--dev files)")
        if cfg.train or cfg.dev or cfg.test:
            raise ValueError("give either --data builtin:NAME or --train/--dev/--test files, not both")
        return load_builtin(name, path=builtin_path), []
    if not cfg.train:
        raise ValueError("no training data: pass --train FILE (and --dev, --test) or --data builtin:NAME")
    default_reader = read is None
    read = read or (read_labelled if kind == "classify" else read_tagged)
    splits, reports = {}, []
    for split in ("train", "dev", "test"):
        path = getattr(cfg, split)
        if path:
            splits[split], report = read(path, skip_bad_rows=cfg.skip_bad_rows)
            reports.append(report)
            if not splits[split]:
                raise ValueError(f"{path}: no usable examples")
    if default_reader:  # classify / ner fine-tuning: the head predicts the training labels only
        _check_labels_seen_in_training(splits, cfg.train)
    if "dev" not in splits:
        splits["train"], splits["dev"] = split_off_dev(splits["train"], cfg.training.seed)
    return splits, reports


def _check_labels_seen_in_training(splits: dict[str, list[dict]], train_path: str) -> None:
    """A dev or test label (entity type, for NER) that the training file never has cannot be predicted:
    refuse it before training, naming the row."""

    def labels(ex: dict) -> set[str]:
        return {ex["label"]} if "label" in ex else {t[2:] for t in ex.get("tags", ()) if t != "O"}

    known = set().union(*(labels(ex) for ex in splits["train"]))
    for split in ("dev", "test"):
        for ex in splits.get(split, ()):
            unseen = labels(ex) - known
            if unseen:
                what = "label" if "label" in ex else "entity type"
                raise ValueError(
                    f"{ex.get('source', split)}: {what} {sorted(unseen)[0]!r} never occurs in the training data "
                    f"({train_path} has {', '.join(sorted(known))})"
                )


def skipped_rows(reports: list[ReadReport]) -> dict[str, list[str]]:
    """The rows --skip-bad-rows skipped, by file, for results.json."""
    return {r.path: r.skipped for r in reports if r.skipped}


def build_task(kind: str, tok: LMTokenizer, settings: dict, splits: dict | None = None, dropout: float = 0.1):
    """A task from its settings (task.json), optionally with train / dev examples."""
    splits = splits or {}
    examples = {"train_examples": splits.get("train", ()), "dev_examples": splits.get("dev", ())}
    if kind == "classify":
        return ClassificationTask(
            tok, settings["labels"], max_len=settings["max_len"], pooling=settings["pooling"], dropout=dropout,
            selection=settings.get("selection", "accuracy"), **examples,
        )  # fmt: skip
    return NERTask(
        tok, settings["tags"], max_len=settings["max_len"], overlap=settings["overlap"], head=settings["head"],
        dropout=dropout, **examples,
    )  # fmt: skip


def _encoder(cfg: FinetuneConfig, base: BertConfig) -> tuple[Bert, Pooler | None]:
    """The encoder to fine-tune (no MLM head, no pooler) and the pretrained pooler, if any."""
    changes: dict = {"mlm_head": False, "pooler": False}
    if cfg.dropout is not None:
        changes.update(dropout=cfg.dropout, attn_dropout=cfg.dropout)
    torch.manual_seed(cfg.training.seed)
    encoder = Bert(dataclasses.replace(base, **changes))
    if cfg.init == "scratch":
        return encoder, None
    tensors = load_encoder_weights(encoder, cfg.model)
    pooler = None
    if base.pooler and "pooler.dense.weight" in tensors:
        pooler = Pooler(base.d_model)
        pooler.load_state_dict({k.removeprefix("pooler."): v for k, v in tensors.items() if k.startswith("pooler.")})
    return encoder, pooler


def load_encoder_weights(encoder: Bert, model_dir: str | Path) -> dict[str, torch.Tensor]:
    """Load a pretrained BERT directory's weights into ``encoder``, leaving out its MLM head and pooler
    (the ELECTRA discriminator has neither); returns all the file's tensors."""
    path = Path(model_dir) / WEIGHTS_FILE
    tensors = read_safetensors(path)
    kept = {k: v for k, v in tensors.items() if not k.startswith(("mlm_head.", "pooler."))}
    check_state(encoder, kept, source=str(path))
    encoder.load_state_dict(kept)
    return tensors


def finetune(cfg: FinetuneConfig, kind: Literal["classify", "ner"]) -> dict:
    """Fine-tune, then evaluate the best checkpoint on dev and test; returns results.json's content."""
    started = time.perf_counter()
    run_dir = Path(cfg.out)
    with run_session(run_dir, resume=bool(cfg.resume), device=cfg.training.device) as d:
        splits, reports = load_splits(cfg, kind)
        tok = load_tokenizer(cfg.model)
        base = read_config(cfg.model)
        if not isinstance(base, BertConfig):
            raise ValueError(f"{cfg.model}: fine-tuning for classification / NER needs a BERT-family model")
        max_len = cfg.max_len or min(128, base.max_seq_len)
        if max_len > base.max_seq_len:
            raise ValueError(f"max_len={max_len} exceeds the model's max_seq_len={base.max_seq_len}")
        encoder, pooler = _encoder(cfg, base)
        if kind == "classify":
            settings = {"labels": label_set(splits["train"]), "pooling": cfg.pooling, "selection": cfg.selection}
        else:
            overlap = max_len // 4 if cfg.overlap is None else cfg.overlap
            settings = {"tags": tag_set(splits["train"]), "overlap": overlap, "head": cfg.head}
        settings["max_len"] = max_len
        dropout = encoder.cfg.dropout
        task = build_task(kind, tok, settings, splits, dropout=dropout)
        model = task.build_model(encoder, pretrained_pooler=pooler)
        training = training_for_epochs(cfg.training, cfg.epochs, len(task.train_items))
        if d.is_main:
            write_yaml(run_dir / "config.yaml", cfg)
        summary = fit(model, task, training, run_dir=run_dir, resume=bool(cfg.resume))
        results = {}
        if d.is_main:
            chosen = _load_best(model, run_dir, summary)
            _write_run(run_dir, model, task, cfg.model)
            results = _evaluate_splits(task, model, splits, d.device)
            results.update(
                task=kind, model=cfg.model, init=cfg.init, weights=f"{checkpoint.STATE_DIR}/{chosen}",
                data=_data_report(cfg, splits, reports, task), training=summary, definitions=DEFINITIONS,
                wall_seconds=round(time.perf_counter() - started, 2),
            )  # fmt: skip
            write_json(run_dir / "results.json", results)
            write_report(run_dir, results)
    return results


def _load_best(model: nn.Module, run_dir: Path, summary: dict) -> str:
    return checkpoint.load_best(model, run_dir, summary.get("best_step")).name


def _write_run(run_dir: Path, model: nn.Module, task, source: str) -> None:
    save_model(model.encoder, run_dir)
    head = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if not k.startswith("encoder.")}
    tmp = run_dir / (HEAD_FILE + ".tmp")
    save_file(head, str(tmp), metadata={"format": "pt"})
    tmp.replace(run_dir / HEAD_FILE)
    write_json(run_dir / TASK_FILE, task.settings())
    copy_tokenizer_files(source, run_dir)


def _evaluate_splits(task, model: nn.Module, splits: dict, device: torch.device) -> dict:
    out = {}
    for split in ("dev", "test"):
        if splits.get(split):
            out[split] = evaluate_examples(task, model, splits[split], device=device)
    return out


def evaluate_examples(task, model: nn.Module, examples: list[dict], *, device: torch.device) -> dict:
    if isinstance(task, ClassificationTask):
        return task.evaluate(model, device=device, items=task.encode(examples, split="eval"))
    return task.evaluate(model, device=device, examples=examples)


def _data_report(cfg: FinetuneConfig, splits: dict, reports: list[ReadReport], task) -> dict:
    return {
        "source": cfg.data or {s: getattr(cfg, s) for s in ("train", "dev", "test") if getattr(cfg, s)},
        "examples": {s: len(v) for s, v in splits.items()},
        "training_items": len(task.train_items),
        "skipped_rows": skipped_rows(reports),
        "truncated": dict(task.truncated),
    }


def load_finetuned(run_dir: str | Path):
    """(task, model) of a fine-tuned run directory, the model in eval mode on the CPU."""
    run_dir = Path(run_dir)
    if not (run_dir / TASK_FILE).is_file():
        raise ValueError(f"{run_dir}: no {TASK_FILE}; pass a run directory written by `lmforge finetune`")
    settings = read_json_object(run_dir / TASK_FILE, what="task file")
    if settings.get("task") not in ("classify", "ner"):
        raise ValueError(f"{run_dir / TASK_FILE}: task {settings.get('task')!r} is not 'classify' or 'ner'")
    tok = load_tokenizer(run_dir)
    encoder = Bert(read_config(run_dir))
    task = build_task(settings["task"], tok, settings)
    model = task.build_model(encoder)
    encoder_state = read_safetensors(run_dir / WEIGHTS_FILE)
    check_state(model.encoder, encoder_state, source=str(run_dir / WEIGHTS_FILE))
    head_state = read_safetensors(run_dir / HEAD_FILE)
    expected = {k for k in model.state_dict() if not k.startswith("encoder.")}
    if set(head_state) != expected:
        raise ValueError(
            f"{run_dir / HEAD_FILE}: head tensors {sorted(head_state)} do not match {TASK_FILE} "
            f"(expected {sorted(expected)})"
        )
    model.load_state_dict({**{f"encoder.{k}": v for k, v in encoder_state.items()}, **head_state})
    return task, model.eval()


def write_report(run_dir: Path, results: dict) -> None:
    """report.md: metrics table, curves, confusion matrix (classification) or error table (NER)."""
    lines = [f"# Fine-tuning run `{run_dir.name}` ({results['task']}, init: {results['init']})", ""]
    lines += ["| split | metric | value |", "|---|---|---|"]
    keys = ("accuracy", "macro_f1", "loss") if results["task"] == "classify" else ("f1", "precision", "recall", "loss")
    for split in ("dev", "test"):
        for key in keys if split in results else ():
            lines.append(f"| {split} | {key} | {results[split][key]:.4f} |")
    t = results["training"]
    speed = f"{t['tokens']:,} real tokens in {t['seconds'] / 60:.1f} min ({t['tokens_per_s']:,.0f} tokens/s)"
    best = ", ".join(f"{k} {v:.4f}" for k, v in (t["best_dev"] or {}).items()) or "-"
    lines += ["", f"Training: {t['steps']} steps, {speed}; best dev {best} at step {t['best_step']}.", ""]
    data = results["data"]
    cut = "split into overlapping windows" if results["task"] == "ner" else "truncated to max_len"
    lines += [f"Data: {data['source']}; examples {data['examples']}; longer than the window ({cut}): "
              f"{data['truncated']}; skipped bad rows: {sum(len(v) for v in data['skipped_rows'].values())}.",
              "", "![loss](loss.png)", ""]  # fmt: skip
    final = results.get("test") or results.get("dev")
    if results["task"] == "classify" and final:
        plot_confusion(final["confusion_matrix"], final["labels"], run_dir / "confusion.png",
                       title=f"{'test' if 'test' in results else 'dev'} confusion matrix")  # fmt: skip
        lines += ["![confusion matrix](confusion.png)", ""]
        lines += ["| label | precision | recall | F1 | support |", "|---|---|---|---|---|"]
        for name, s in final["per_class"].items():
            lines.append(f"| {name} | {s['precision']:.4f} | {s['recall']:.4f} | {s['f1']:.4f} | {s['support']} |")
    elif final:
        header = "| type | precision | recall | F1 | support | correct | wrong type | wrong span | missed | spurious |"
        lines += [header, "|---|---|---|---|---|---|---|---|---|---|"]
        for kind, s in final["per_type"].items():
            e = final["errors"].get(kind, {})
            lines.append(
                f"| {kind} | {s['precision']:.4f} | {s['recall']:.4f} | {s['f1']:.4f} | {s['support']} | "
                f"{e.get('correct', 0)} | {e.get('wrong_type', 0)} | {e.get('wrong_span', 0)} | "
                f"{e.get('missed', 0)} | {e.get('spurious', 0)} |"
            )
    lines += ["", "Definitions: see `definitions` in results.json."]
    (run_dir / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


# --- evaluate and predict ---------------------------------------------------------------------------


@dataclass
class EvaluateConfig:
    """Evaluate a fine-tuned run directory on labelled data."""

    model: str
    """Run directory written by `lmforge finetune`."""
    data: str
    """Labelled file (CSV / TSV / JSONL, or CoNLL for NER), or builtin:NAME[:SPLIT] (default split: test)."""
    output: str | None = None
    """Write the metrics here as JSON (and, for classification, a confusion-matrix PNG beside it)."""
    skip_bad_rows: bool = False
    """Skip malformed rows instead of stopping at the first."""


def evaluate_command(cfg: EvaluateConfig) -> dict:
    if cfg.output:
        check_output_file(cfg.output, inputs=[cfg.data])
    task, model = load_finetuned(cfg.model)
    if cfg.data.startswith("builtin:"):
        name, _, split = cfg.data.removeprefix("builtin:").partition(":")
        examples = load_builtin(name).get(split or "test")
        if examples is None:
            raise ValueError(f"--data {cfg.data}: split {split!r} is not train, dev or test")
    else:
        read = read_labelled if task.name == "classify" else read_tagged
        examples, _ = read(cfg.data, skip_bad_rows=cfg.skip_bad_rows)
    metrics = evaluate_examples(task, model, examples, device=torch.device("cpu"))
    if cfg.output:
        write_json(cfg.output, {"data": cfg.data, "model": cfg.model, **metrics, "definitions": DEFINITIONS})
        if task.name == "classify":
            plot_confusion(metrics["confusion_matrix"], metrics["labels"], Path(cfg.output).with_suffix(".png"))
    return metrics


@dataclass
class PredictConfig:
    """Predict with a fine-tuned run directory: JSONL out, one line per input text."""

    model: str
    """Run directory written by `lmforge finetune`."""
    input: str
    """Texts: .txt (one per line), .jsonl / .csv / .tsv with a 'text' field (and 'text_pair')."""
    output: str
    """JSONL: the input fields plus label, score, scores (classification) or entities (NER)."""
    skip_bad_rows: bool = False
    """Skip malformed rows instead of stopping at the first."""


def predict_command(cfg: PredictConfig) -> int:
    check_output_file(cfg.output, inputs=[cfg.input])
    task, model = load_finetuned(cfg.model)
    examples, _ = read_labelled(cfg.input, skip_bad_rows=cfg.skip_bad_rows, need_label=False)
    predictions = task.predict(model, examples, device=torch.device("cpu"))
    rows = (
        {**{k: v for k, v in ex.items() if k != "source"}, **p} for ex, p in zip(examples, predictions, strict=True)
    )
    return write_jsonl(cfg.output, rows)
