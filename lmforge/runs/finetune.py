"""The one fine-tuning recipe: classify, ner, translate, chat and embed all run ``finetune(cfg, task)``.

1. hold the run directory (``runs/session.run_session``: lock, checkpoint check, process group);
2. read the splits (``--data builtin:NAME`` or ``--train/--dev/--test`` files, the task's reader);
3. build the task and the model to train from ``cfg.model`` (the task's ``for_finetuning``);
4. score the splits the task scores before training, train through ``train.loop.fit`` (early stopping
   on the task's dev metric), load the best checkpoint, or the average of the last ``average_last``
   ones when its dev score is at least as good;
5. write the run (``rundir.write_run``), score dev and test once, and render results.json and
   report.md from the typed ``FinetuneResult`` (``runs/results.py``).

Everything task-specific is a hook of the task class (``tasks/base.py``: ``FinetuneTask``), found
through ``TASKS``; nothing here compares task names.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from lmforge.data.builtin import BUILTINS, first_examples, load_builtin
from lmforge.data.readers import ReadReport
from lmforge.errors import UserError
from lmforge.files import write_json, write_yaml
from lmforge.models.lora import ADAPTER_DIR, add_lora, merge_lora, save_adapter
from lmforge.models.registry import WEIGHTS_FILE, read_safetensors
from lmforge.rundir import RECIPE_FILE, Run, write_run
from lmforge.rundir.layout import check_output_dir, is_training_run
from lmforge.runs.config import FinetuneConfig
from lmforge.runs.results import FinetuneResult, write_report
from lmforge.runs.session import run_session
from lmforge.tasks import TASKS, TaskEntry, resolve, task_entry
from lmforge.train import checkpoint, distributed
from lmforge.train.config import TrainConfig
from lmforge.train.loop import fit


def finetune(cfg: FinetuneConfig, task_name: str) -> FinetuneResult | None:
    """Fine-tune, choose the weights, score dev and test; the result (None on processes other than the first)."""
    entry = task_entry(task_name, kind="finetune")
    task_cls = entry.load()
    started = time.perf_counter()
    run_dir = check_output_dir(cfg.out, inputs=[cfg.model], reusable=is_training_run)
    with run_session(run_dir, resume=cfg.resume, device=cfg.training.device) as d:
        settings = cfg.task_settings()  # the task sees its own settings, not the recipe's
        splits, reports = load_splits(cfg, entry, task_cls.reader(settings), builtin_path=cfg.builtin_path())
        splits = task_cls.prepare_splits(settings, splits)
        if d.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            write_yaml(run_dir / RECIPE_FILE, cfg)
        task, model = task_cls.for_finetuning(settings, splits, run_dir)
        if cfg.lora.rank:
            add_lora(model, cfg.lora)
        training = training_for_epochs(cfg.training, cfg.epochs, len(task.train_items))
        before = {}
        if d.is_main:
            before = {
                s: task.evaluate(model, splits[s], device=d.device) for s in task.evaluate_before if splits.get(s)
            }
        summary = fit(model, task, training, run_dir=run_dir, resume=cfg.resume, write_results=False)
        if not d.is_main:
            return None
        if distributed.is_sharded(model):  # FSDP: the first process scores a whole copy, loaded from the checkpoint
            task, model = task_cls.for_finetuning(settings, splits, run_dir)
            model.to(d.device)
        weights, dev = choose_weights(model, task, run_dir, summary, cfg.average_last, d.device)
        if cfg.lora.rank:  # the adapters in PEFT's files, then the merged model as every run holds it
            save_adapter(model, cfg.lora, run_dir / ADAPTER_DIR, base=str(cfg.model))
            merge_lora(model)
        write_run(run_dir, task, model, tokenizer_source=cfg.model)
        scores = {"dev": dev}
        if splits.get("test"):
            scores["test"] = task.evaluate_test(model, splits["test"], device=d.device)
        explained = _explain_for_report(entry, run_dir, task, model, splits.get("test") or splits.get("dev") or [])
        result = FinetuneResult(
            task=task_name,
            model=cfg.model,
            weights=weights,
            scores=scores,
            before=before,
            columns=task.report_columns,
            data=data_report(cfg, splits, reports, task),
            training=summary,
            extras={**task.extras(), **({"explained": explained} if explained else {})},
            init=cfg.initialisation(),
            wall_seconds=round(time.perf_counter() - started, 2),
        )
        write_json(run_dir / "results.json", result.to_json())
        write_report(run_dir, result)
    return result


def _explain_for_report(entry, run_dir: Path, task, model: nn.Module, examples: list[dict]) -> list[dict]:
    """The report's explained examples, for tasks whose TASKS entry puts explanations in the report."""
    saved = TASKS[entry.saves_as or entry.name]  # a distilled run is explained as the task it writes
    if saved.explaining is None or not saved.explaining.in_report or not examples:
        return []
    from lmforge.explain.report import explain_for_report

    return explain_for_report(Run(saved.name, task, model, run_dir, finetuned=True), examples)


def choose_weights(model: nn.Module, task, run_dir: Path, summary: dict, average_last: int, device: torch.device):
    """Load the best checkpoint, or the average of the last ``average_last`` when its dev score (the task's
    selection metric) is at least as good; returns (what was chosen, its dev metrics)."""
    best = checkpoint.load_best(model, run_dir, summary.get("best_step"))
    dev = task.evaluate(model, device=device)
    chosen = f"{checkpoint.STATE_DIR}/{best.name}"
    if average_last < 2:
        return chosen, dev
    metric, direction = task.selection
    last = checkpoint.checkpoint_dirs(run_dir)[-average_last:]
    states = [read_safetensors(p / WEIGHTS_FILE) for p in last]
    averaged = {k: sum(s[k].float() for s in states) / len(states) for k in states[0]}
    best_state = {k: v.clone() for k, v in model.state_dict().items()}
    checkpoint.load_trained(model, averaged, source="the averaged checkpoints")
    dev_avg = task.evaluate(model, device=device)
    better = dev_avg[metric] >= dev[metric] if direction == "max" else dev_avg[metric] <= dev[metric]
    names = [p.name for p in last]
    if better:
        dev_avg.update(averaged=names, best_single={"checkpoint": best.name, metric: dev[metric]})
        return "average of " + ", ".join(names), dev_avg
    model.load_state_dict(best_state)
    dev["average_rejected"] = {"checkpoints": names, metric: dev_avg[metric]}
    return chosen, dev


def data_report(cfg: FinetuneConfig, splits: dict, reports: list[ReadReport], task) -> dict:
    return {
        "source": cfg.data or {s: getattr(cfg, s) for s in ("train", "dev", "test") if getattr(cfg, s)},
        "examples": {s: len(v) for s, v in splits.items()},
        **({"limit": cfg.limit} if cfg.limit else {}),
        "training_items": len(task.train_items),
        "skipped_rows": skipped_rows(reports),
        **({"read_as": notes} if (notes := [n for r in reports for n in r.notes]) else {}),
        "truncated": dict(task.truncated),
    }


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
    cfg,
    entry: TaskEntry,
    read: Callable[..., tuple[list[dict], ReadReport]] | None = None,
    *,
    builtin_path: str | None = None,
) -> tuple[dict[str, list[dict]], list[ReadReport]]:
    """train / dev / test examples from --data builtin:NAME or the files, and what reading skipped.

    ``cfg`` needs ``data``, ``train``, ``dev``, ``test``, ``skip_bad_rows``, ``limit`` and ``training.seed``;
    ``entry.builtin`` is the built-in corpora's task (classify, ner, dialogue, translate); ``read(path,
    skip_bad_rows=...)`` reads one file (default: the reader of the task's labelled ``files``, after which dev
    or test labels the training data never has are refused). Without a dev file, 10% of train (fixed seed) is
    held out. ``limit`` (> 0) keeps the first that many examples of each split, after the hold-out.
    """
    kind = entry.builtin
    if cfg.data:
        name = cfg.data.removeprefix("builtin:")
        if not cfg.data.startswith("builtin:") or name not in BUILTINS or BUILTINS[name].task != kind:
            names = [f"builtin:{n}" for n, b in BUILTINS.items() if b.task == kind]
            if not names:
                raise UserError(
                    f"--data {cfg.data!r}: `lmforge {entry.command_name}` has no built-in corpus; pass --train FILE"
                )
            raise UserError(f"--data {cfg.data!r}: expected one of {', '.join(names)} (or --train/--dev files)")
        if cfg.train or cfg.dev or cfg.test:
            raise UserError("give either --data builtin:NAME or --train/--dev/--test files, not both")
        return first_examples(load_builtin(name, path=builtin_path), cfg.limit), []
    if not cfg.train:
        raise UserError("no training data: pass --train FILE (and --dev, --test) or --data builtin:NAME")
    default_reader = read is None
    if read is None:  # a distillation reads the files of the task it writes
        files = TASKS[entry.saves_as or entry.name].files
        assert files is not None, f"{entry.name}: a task without its own reader declares its files in TASKS"
        read = resolve(files.reader)
    splits, reports = {}, []
    for split in ("train", "dev", "test"):
        path = getattr(cfg, split)
        if path:
            splits[split], report = read(path, skip_bad_rows=cfg.skip_bad_rows)
            reports.append(report)
            if not splits[split]:
                raise UserError(f"{path}: no usable examples")
    if "dev" not in splits:
        n = len(splits["train"])
        if n - max(1, n // 10) < 2:  # what is left to train on after the held-out 10% (at least one row)
            raise UserError(
                f"{cfg.train}: {n} usable row(s); holding out a dev split would leave {n - max(1, n // 10)} to train "
                "on. Give --dev FILE, or more rows"
            )
        splits["train"], splits["dev"] = split_off_dev(splits["train"], cfg.training.seed)
    splits = first_examples(splits, cfg.limit)
    if default_reader:  # a head over labels or tags predicts the training labels only
        _check_labels_seen_in_training(splits, cfg.train)
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
                raise UserError(
                    f"{ex.get('source', split)}: {what} {sorted(unseen)[0]!r} never occurs in the training data "
                    f"({train_path} has {', '.join(sorted(known))})"
                )


def skipped_rows(reports: list[ReadReport]) -> dict[str, list[str]]:
    """The rows --skip-bad-rows skipped, by file, for results.json."""
    return {r.path: r.skipped for r in reports if r.skipped}
