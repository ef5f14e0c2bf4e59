"""``lmforge evaluate``: score a fine-tuned run on labelled data with the task's own ``evaluate``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lmforge.commands._console import console, print_table
from lmforge.errors import UserError


@dataclass
class Config:
    """Evaluate a fine-tuned run directory on labelled data."""

    model: str
    """Run directory written by `lmforge finetune`."""
    data: str
    """Labelled file (CSV / TSV / JSONL, or CoNLL for NER), or builtin:NAME[:SPLIT] (default split: test)."""
    output: str | None = None
    """Write the metrics here as JSON (and, for classification, a confusion-matrix PNG beside it)."""
    skip_bad_rows: bool = False
    """Skip malformed rows instead of stopping at the first."""


def evaluate(cfg: Config) -> dict:
    import torch

    from lmforge.data.builtin import BUILTINS, load_builtin
    from lmforge.files import write_json
    from lmforge.metrics import DEFINITIONS, plot_confusion
    from lmforge.rundir import load_run, require_capability
    from lmforge.rundir.layout import check_output_files
    from lmforge.tasks import resolve

    entry = require_capability(cfg.model, "files", command="lmforge evaluate")
    if cfg.output:
        check_output_files([cfg.output, Path(cfg.output).with_suffix(".png")], inputs=[cfg.data])
    run = load_run(cfg.model)
    if cfg.data.startswith("builtin:"):
        name, _, split = cfg.data.removeprefix("builtin:").partition(":")
        corpus = BUILTINS.get(name)
        if corpus is not None and corpus.task != entry.builtin:
            fits = [f"builtin:{n}" for n, b in BUILTINS.items() if b.task == entry.builtin]
            raise UserError(f"--data {cfg.data}: a {corpus.task} corpus; a {entry.name} run takes {', '.join(fits)}")
        examples = load_builtin(name).get(split or "test")
        if examples is None:
            raise UserError(f"--data {cfg.data}: split {split!r} is not train, dev or test")
    else:
        examples, _ = resolve(entry.files.reader)(cfg.data, skip_bad_rows=cfg.skip_bad_rows)
    if not examples:
        raise UserError(f"--data {cfg.data}: no examples to evaluate on")
    metrics = run.task.evaluate(run.model, examples, device=torch.device("cpu"))
    if cfg.output:
        write_json(cfg.output, {"data": cfg.data, "model": cfg.model, **metrics, "definitions": DEFINITIONS})
        if "confusion_matrix" in metrics:
            plot_confusion(metrics["confusion_matrix"], metrics["labels"], Path(cfg.output).with_suffix(".png"))
    return metrics


def run(cfg: Config) -> None:
    metrics = evaluate(cfg)
    scalars = [[k, f"{v:.4f}"] for k, v in metrics.items() if isinstance(v, float)]
    print_table(f"{cfg.model} on {cfg.data}", ["metric", "score"], scalars)
    if cfg.output:
        console.print(f"[green]wrote[/green] {cfg.output}")
