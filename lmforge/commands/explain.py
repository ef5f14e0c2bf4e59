"""``lmforge explain``: token attributions of a classify, NER, embedding, translation or GPT run for a text or a file,
as JSONL plus an HTML page and a PNG beside it (``lmforge/explain/``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lmforge.commands._console import console
from lmforge.errors import UserError


@dataclass
class Config:
    """Explain a run's predictions: which tokens drove them (Integrated Gradients, gradient x input, occlusion, or
    attention rollout), aligned to the characters of each text."""

    model: str
    """Run directory from `lmforge finetune classify|ner|embed|translate|chat`, or a pretrained BERT / GPT directory."""
    output: str
    """JSONL to write, one line per explanation (NER: one per entity; embed: one per text of the pair; translate and
    chat: one per generated token); the HTML page and the PNG are written beside it (same name, .html, .png)."""
    input: str | None = None
    """Texts: .txt (one per line), .jsonl / .csv / .tsv with a 'text' field ('text_pair' for an embedding run)."""
    text: str | None = None
    """One text, instead of --input."""
    text_pair: str | None = None
    """With --text and an embedding run: the second text (the similarity of the two is explained)."""
    method: Literal["ig", "grad-x-input", "occlusion", "attention"] = "ig"
    """ig: Integrated Gradients on the embeddings; grad-x-input; occlusion ([MASK] per token: one forward pass per
    token, 2.5 min for e5-small's full 512-token window on 2 cores; encoders only); attention: rollout (translate: the
    decoder's cross-attention). Only what the model reads (its window) is explained; the rest of a longer text is
    left out, and the log and the pictures say so."""
    label: str | None = None
    """Classification: the label to explain (default: the predicted one)."""
    steps: int = 50
    """Integrated Gradients' interpolation steps (more: a smaller completeness gap)."""
    baseline: Literal["pad", "mask"] = "pad"
    """Integrated Gradients' baseline: every text token replaced by [PAD] or by [MASK]."""
    png: bool = True
    """Also draw the PNG (needs a CJK font: apt install fonts-wqy-microhei)."""


def explain_file(cfg: Config) -> tuple[int, Path, Path | None]:
    """Check everything, then write the explanations (``explain/report.write_explanations``); returns (count, HTML
    path, PNG path or None)."""
    from lmforge.data.readers import read_labelled
    from lmforge.explain.report import write_explanations
    from lmforge.explain.targets import check_request, explaining_of, refuse_compressed
    from lmforge.rundir import backend_of, load_run, task_name_of
    from lmforge.rundir.layout import check_output_files

    if (cfg.input is None) == (cfg.text is None):
        raise UserError("give exactly one of --input FILE and --text TEXT")
    if cfg.text_pair is not None and cfg.text is None:
        raise UserError("--text-pair goes with --text (a file gives each row's text_pair column)")
    if cfg.steps < 1:
        raise UserError(f"--steps {cfg.steps}: must be a positive integer")
    if cfg.text is not None and not cfg.text.strip():
        raise UserError("--text is empty: give a text to explain")
    task_name = task_name_of(cfg.model)
    explaining = explaining_of(task_name)
    check_request(explaining, task_name, method=cfg.method, label=cfg.label, baseline=cfg.baseline)
    refuse_compressed(cfg.model, backend_of(cfg.model))
    out = Path(cfg.output)
    check_output_files(
        [out, out.with_suffix(".html"), *([out.with_suffix(".png")] if cfg.png else [])],
        inputs=[cfg.input] if cfg.input else [],
    )
    if cfg.text is not None:
        examples = [{"text": cfg.text, **({"text_pair": cfg.text_pair} if cfg.text_pair else {})}]
    else:
        examples, _ = read_labelled(cfg.input, need_label=False)
    if explaining.inputs == "pair":
        missing = [i + 1 for i, ex in enumerate(examples) if not ex.get("text_pair")]
        if missing:
            where = "--text-pair" if cfg.text is not None else f"{cfg.input}: rows {missing[:5]} have no text_pair"
            raise UserError(f"an embedding run explains the similarity of two texts: {where}")
    run = load_run(cfg.model)
    return write_explanations(
        run, examples, out, method=cfg.method, label=cfg.label, steps=cfg.steps, baseline=cfg.baseline, png=cfg.png
    )


def run(cfg: Config) -> None:
    n, html_path, png_path = explain_file(cfg)
    shown = f"{html_path}" + (f" and {png_path}" if png_path else "")
    console.print(f"[green]wrote[/green] {n} explanations to {cfg.output}; view them in {shown}")
