"""``lmforge predict``: predictions of a fine-tuned run for a file of texts, one JSONL line per input."""

from __future__ import annotations

from dataclasses import dataclass

from lmforge.commands._console import console


@dataclass
class Config:
    """Predict with a fine-tuned run directory: JSONL out, one line per input text."""

    model: str
    """Run directory written by `lmforge finetune`."""
    input: str
    """Texts: .txt (one per line), .jsonl / .csv / .tsv with a 'text' field (and 'text_pair')."""
    output: str
    """JSONL: the input fields plus label, score, scores (classification) or entities (NER); a field the input
    already has (a gold label) comes as predicted_label and so on."""
    skip_bad_rows: bool = False
    """Skip malformed rows instead of stopping at the first."""


def predict(cfg: Config) -> int:
    import torch

    from lmforge.data.readers import read_labelled, write_jsonl
    from lmforge.rundir import load_run, require_capability
    from lmforge.rundir.layout import check_output_files

    require_capability(cfg.model, "predicts", command="lmforge predict (translate, embed and chat have their own)")
    check_output_files([cfg.output], inputs=[cfg.input])
    run = load_run(cfg.model)
    examples, _ = read_labelled(cfg.input, skip_bad_rows=cfg.skip_bad_rows, need_label=False)
    predictions = run.task.predict(run.model, examples, device=torch.device("cpu"))
    rows = (_row(ex, p) for ex, p in zip(examples, predictions, strict=True))
    return write_jsonl(cfg.output, rows)


def _row(example: dict, prediction: dict) -> dict:
    """The input's fields as they were, then the prediction's; a prediction field the input already has (a gold
    label) is written as ``predicted_<field>``, so neither hides the other."""
    row = {k: v for k, v in example.items() if k != "source"}
    for key, value in prediction.items():
        row[f"predicted_{key}" if key in row else key] = value
    return row


def run(cfg: Config) -> None:
    console.print(f"[green]wrote[/green] {predict(cfg)} predictions to {cfg.output}")
