"""``lmforge compare``: pretraining objectives at equal FLOPs, each fine-tuned on the built-in tasks
(``runs/compare.py``)."""

from __future__ import annotations

from lmforge.commands._console import console, print_table
from lmforge.runs.config import CompareConfig

Config = CompareConfig


def run(cfg: CompareConfig) -> None:
    from lmforge.runs.compare import run_compare

    summary = run_compare(cfg)
    rows = []
    for name, s in summary["summary"].items():
        cells = [f"{s[data]['mean']:.4f} ± {s[data]['std']:.4f}" for data in ("reviews-sentiment", "peoples-daily-ner")]
        minutes = s.get("pretraining_minutes")
        rows.append([name, *cells, "-" if minutes is None else f"{minutes['mean']:.1f}"])
    b = summary["budget"]
    title = f"equal compute ({b['budget_flops'] / 1e15:.2f} PFLOPs each, {len(cfg.seeds)} seeds): {cfg.out}/report.md"
    print_table(title, ["objective", "sentiment accuracy", "NER entity F1", "pretraining min"], rows)
    if summary["claim"]:
        holds = summary["claim"]["electra_at_least_mlm"]
        console.print(f"ELECTRA >= MLM on both tasks: {'holds' if holds else 'does not hold'}")
