"""Explanations written to files: a fine-tune's report examples and ``lmforge explain``'s output.

- ``explained_examples``: Integrated Gradients for the first correctly and wrongly predicted labelled examples of a
  task that implements ``ExplainsExamples`` (classification, NER), as ``report.md`` shows them;
- ``explain_for_report``: those examples written to ``explanations.jsonl`` / ``.html`` / ``.png`` in a run
  directory, and the rows report.md renders;
- ``write_explanations``: explanations of many inputs as JSONL, the HTML page beside it and the PNG.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lmforge.data.readers import write_jsonl
from lmforge.errors import UserError
from lmforge.explain.attribution import Explanation
from lmforge.explain.targets import explain
from lmforge.explain.views import cjk_font, render_html, render_png
from lmforge.files import write_text
from lmforge.tasks.base import ExplainsExamples

logger = logging.getLogger(__name__)

MAX_OUTPUTS = 4
"""A report explains an input only when it has at most this many outputs (an untrained NER model predicts entities
everywhere, and each costs an Integrated Gradients run of ``steps`` forward and backward passes)."""


def explained_examples(
    run, examples: Sequence[dict], *, per_kind: int = 2, steps: int = 32, scan: int = 200
) -> list[dict[str, Any]]:
    """Integrated Gradients for the first ``per_kind`` correctly and wrongly predicted of the first ``scan``
    labelled examples (classification: the predicted label; NER: every predicted entity of the sentence), as rows
    ``{"kind": "correct"|"wrong", "text", "gold", "predicted", "explanations": [Explanation, ...]}``. Inputs the
    task passes over (text pairs), sentences with more than ``MAX_OUTPUTS`` predicted entities and sentences longer
    than the model's window are left out: at most 4 x ``MAX_OUTPUTS`` explanations of ``steps`` steps."""
    task = run.task
    if not isinstance(task, ExplainsExamples):
        return []
    pairs = [(ex, task.report_input(ex)) for ex in examples[:scan]]
    pairs = [(ex, text) for ex, text in pairs if text is not None]
    predicted = task.predict(run.model, [text for _, text in pairs], device=torch.device("cpu"))
    rows: list[dict[str, Any]] = []
    counts = {"correct": 0, "wrong": 0}
    for (ex, text), pred in zip(pairs, predicted, strict=True):
        gold, guess = task.report_outcome(ex, text, pred)
        kind = "correct" if gold == guess else "wrong"
        if counts[kind] >= per_kind or len(pred.get("entities", ())) > MAX_OUTPUTS:
            continue
        try:
            explanations = explain(run, text, method="ig", steps=steps)
        except UserError:  # longer than one window
            continue
        counts[kind] += 1
        rows.append(
            {"kind": kind, "text": text["text"], "gold": gold, "predicted": guess, "explanations": explanations}
        )
        if all(c >= per_kind for c in counts.values()):
            break
    return rows


def explain_for_report(run, examples: list[dict]) -> list[dict]:
    """A few correctly and wrongly predicted examples explained by Integrated Gradients (tasks whose explanations are
    ``in_report``): written to explanations.jsonl / .html / .png in the run directory and returned as report rows
    (the top tokens of each explanation). The PNG needs a CJK font; without one the report says how to get it."""
    run.model.to("cpu").eval()
    rows = explained_examples(run, examples)
    if not rows:
        return []
    run_dir = Path(run.directory)
    flat = [e for r in rows for e in r["explanations"]]
    write_jsonl(
        run_dir / "explanations.jsonl", ({"kind": r["kind"], **e.to_json()} for r in rows for e in r["explanations"])
    )
    write_text(run_dir / "explanations.html", render_html(flat, title=f"{run_dir.name}: why?"))
    try:
        render_png(flat, run_dir / "explanations.png", font=cjk_font())
        png = "explanations.png"
    except UserError as e:
        png = str(e)
    return [_report_row(r, e, png) for r in rows for e in r["explanations"] or [None]]


def _report_row(row: dict, e: Explanation | None, png: str) -> dict:
    top = [] if e is None else sorted(e.tokens, key=lambda t: -t.score)[:3]
    return {
        "kind": row["kind"],
        "text": row["text"],
        "gold": row["gold"],
        "predicted": row["predicted"],
        "target": None if e is None else e.target,
        "value": None if e is None else round(e.value, 4),
        "top_tokens": [[t.token, round(t.score, 4)] for t in top],
        "png": png,
    }


def write_explanations(
    run, examples: list[dict], out: Path, *, method: str, label: str | None, steps: int, baseline: str, png: bool
) -> tuple[int, Path, Path | None]:
    """Explain every input of ``examples``: one JSONL line per explanation (with its input's index) in ``out``, the
    HTML page (``out`` with .html) and, with ``png``, the picture (.png; needs a CJK font, checked first). Returns
    (lines written, HTML path, PNG path or None)."""
    html_path, png_path = out.with_suffix(".html"), out.with_suffix(".png") if png else None
    font = cjk_font() if png else None  # refused before any work when there is none
    explanations, rows = [], []
    for i, ex in enumerate(examples):
        found = explain(run, ex, method=method, label=label, steps=steps, baseline=baseline)
        for e in found:
            explanations.append(e)
            rows.append({"input": i, **e.to_json()})
        cut = {(e.text, e.extra["read_chars"]) for e in found if "read_chars" in e.extra}
        for text, read in sorted(cut):
            logger.warning(
                "input %d: the model read the first %d of its %d characters (its window); the rest is not explained",
                i + 1, read, len(text),
            )  # fmt: skip
    write_jsonl(out, rows)
    write_text(html_path, render_html(explanations, title=f"lmforge explain · {run.directory} · {method}"))
    if png_path is not None:
        render_png(explanations, png_path, font=font)
    return len(rows), html_path, png_path
