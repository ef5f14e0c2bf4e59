"""Typed results of a fine-tuning run, and everything rendered from them: results.json, report.md, the console table.

``FinetuneResult`` is what ``runs/finetune.finetune`` returns. ``to_json()`` is results.json (its keys are
the ones earlier versions wrote: ``dev`` / ``test`` metrics at the top, ``before_finetuning``, ``data``,
``training``, ``definitions``); ``table()`` gives the rows that both report.md and ``lmforge finetune``
print, so the two never disagree. Task-specific sections (confusion matrix, NER error table, sampled
replies, BLEU signatures) are rendered from what the metrics contain.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lmforge.files import write_text
from lmforge.metrics import DEFINITIONS, plot_confusion

SPLITS = ("dev", "test")


@dataclass
class FinetuneResult:
    task: str
    model: str | None
    weights: str
    scores: dict[str, dict]
    """Metrics per split (dev, test) of the chosen weights."""
    before: dict[str, dict]
    """Metrics per split before fine-tuning (tasks whose ``evaluate_before`` names splits)."""
    columns: tuple[str, ...]
    """The metrics the table shows (the task's ``report_columns``)."""
    data: dict
    training: dict
    extras: dict = field(default_factory=dict)
    init: str | None = None
    wall_seconds: float = 0.0

    def to_json(self) -> dict:
        out: dict = {**self.scores, "task": self.task, "model": self.model, "weights": self.weights}
        if self.init is not None:
            out["init"] = self.init
        if self.before:
            out["before_finetuning"] = self.before
        out.update(self.extras)
        out.update(data=self.data, training=self.training, definitions=DEFINITIONS, wall_seconds=self.wall_seconds)
        return out

    def table(self) -> tuple[list[str], list[list[str]]]:
        """(header, rows): one row per split (before fine-tuning first), one column per shown metric."""
        shown = [c for c in self.columns if any(c in m for m in (*self.scores.values(), *self.before.values()))]
        rows = []
        for split in SPLITS:
            for label, metrics in ((f"{split} (before)", self.before.get(split)), (split, self.scores.get(split))):
                if metrics:
                    rows.append([label, *(_cell(metrics.get(c)) for c in shown)])
        return ["split", *shown], rows


def _cell(value) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if abs(value) >= 10 else f"{value:.4f}"


def write_report(run_dir: Path, r: FinetuneResult) -> None:
    """report.md: the metrics table, training and data lines, the curves and the task's own sections."""
    header, rows = r.table()
    lines = [f"# Fine-tuning run `{run_dir.name}` ({r.task}, from {r.model})", ""]
    lines += ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    t = r.training
    best = ", ".join(f"{k} {v:.4f}" for k, v in (t.get("best_dev") or {}).items()) or "-"
    lines += [
        "",
        f"Training: {t['steps']} steps, {t['tokens']:,} real tokens in {t['seconds'] / 60:.1f} min "
        f"({t['tokens_per_s']:,.0f} tokens/s); best dev {best} at step {t['best_step']}; weights: {r.weights}.",
        "",
    ]
    d = r.data
    skipped = sum(len(v) for v in d["skipped_rows"].values())
    lines += [
        f"Data: {d['source']}; examples {d['examples']}; truncated or windowed: {d['truncated']}; "
        f"skipped bad rows: {skipped}.",
        *(f"Note: {note}." for note in d.get("read_as", ())),
        "",
    ]
    if "distillation" in r.extras:
        k = r.extras["distillation"]
        lines += [
            f"Distilled from `{k['teacher']}`: temperature {k['temperature']}, alpha {k['alpha']} on the labelled "
            f"texts, {k['unlabelled']:,} unlabelled and augmented texts with the teacher's soft targets only.",
            "",
        ]
    lines += [
        "![loss](loss.png)",
        "",
    ]
    final_split = "test" if "test" in r.scores else "dev"
    lines += _task_sections(run_dir, r.scores.get(final_split) or {}, final_split)
    lines += _explained_section(r.extras.get("explained") or [], final_split)
    lines += ["Definitions: see `definitions` in results.json."]
    write_text(run_dir / "report.md", "\n".join(lines) + "\n")


def _explained_section(rows: list[dict], split: str) -> list[str]:
    """Why? A few explained examples: the picture (or why there is none) and the top tokens of each output."""
    if not rows:
        return []
    png = rows[0]["png"]
    lines = [
        f"## Why? Explained {split} examples",
        "",
        "Integrated Gradients on the embeddings (`lmforge explain`), for the first correctly and wrongly predicted "
        f"{split} examples: red tokens raise the explained output, blue ones lower it. All of them: "
        "explanations.html and explanations.jsonl.",
        "",
        "![explanations](explanations.png)" if png == "explanations.png" else f"(no picture: {png})",
        "",
        "| | text | gold | predicted | explained output | tokens that raised it most |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        gold = r["gold"] if isinstance(r["gold"], str) else ", ".join(r["gold"]) or "-"
        guess = r["predicted"] if isinstance(r["predicted"], str) else ", ".join(r["predicted"]) or "-"
        target = "-" if r["target"] is None else f"{r['target']} ({r['value']:.3f})"
        top = ", ".join(f"{t} {s:+.3f}" for t, s in r["top_tokens"]) or "-"
        text = r["text"] if len(r["text"]) <= 60 else r["text"][:60] + "…"
        cells = [r["kind"], text, gold, guess, target, top]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return [*lines, ""]


def _task_sections(run_dir: Path, final: dict, split: str) -> list[str]:
    lines: list[str] = []
    if "confusion_matrix" in final:
        plot_confusion(
            final["confusion_matrix"], final["labels"], run_dir / "confusion.png", title=f"{split} confusion matrix"
        )
        lines += [
            "![confusion matrix](confusion.png)",
            "",
            "| label | precision | recall | F1 | support |",
            "|---|---|---|---|---|",
        ]
        for name, s in final["per_class"].items():
            lines.append(f"| {name} | {s['precision']:.4f} | {s['recall']:.4f} | {s['f1']:.4f} | {s['support']} |")
    if "per_type" in final:
        lines += [
            "| type | precision | recall | F1 | support | correct | wrong type | wrong span | missed | spurious |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for kind, s in final["per_type"].items():
            e = final["errors"].get(kind, {})
            counts = " | ".join(str(e.get(k, 0)) for k in ("correct", "wrong_type", "wrong_span", "missed", "spurious"))
            lines.append(
                f"| {kind} | {s['precision']:.4f} | {s['recall']:.4f} | {s['f1']:.4f} | {s['support']} | {counts} |"
            )
    if "samples" in final:
        lines += [f"Sampled {split} replies:", ""]
        lines += [
            f"- user: {s['prompt']!r} -> model: {s['reply']!r} (reference: {s['reference']!r})"
            for s in final["samples"]
        ]
    if "bleu_signature" in final:
        lines.append(f"Signatures: `{final['bleu_signature']}`, `{final['chrf_signature']}`.")
        if "decoding" in final:
            dec = final["decoding"]
            lines.append(
                f"Test decoding: beam {dec['num_beams']}, {dec['seconds']:.1f} s for {final['sentences']} sentences."
            )
    return [*lines, ""] if lines else []
