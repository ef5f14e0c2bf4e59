"""``lmforge demo``: the whole pipeline on built-in Chinese data with baselines side by side (``runs/demo.py``)."""

from __future__ import annotations

from lmforge.commands._console import console, print_table
from lmforge.runs.config import DemoConfig

Config = DemoConfig


def run(cfg: DemoConfig) -> None:
    from lmforge.runs.demo import run_demo

    summary = run_demo(cfg)
    rows = []
    for data, systems in summary["tasks"].items():
        baseline = next(s for s in systems if s not in ("pretrained", "scratch"))
        keys = (
            ("accuracy", "macro_f1") if "accuracy" in systems["pretrained"]["test"] else ("f1", "precision", "recall")
        )
        for key in keys:
            values = [systems[s]["test"][key] for s in ("pretrained", "scratch", baseline)]
            rows.append([data, key, f"{values[0]:.4f}", f"{values[1]:.4f}", f"{values[2]:.4f} ({baseline})"])
    title = f"lmforge demo: test scores ({cfg.out}/results.json, {cfg.out}/report.md)"
    print_table(title, ["task", "metric", "pretrained", "scratch", "baseline"], rows)
    total, planned = summary["wall_seconds"]["total"] / 60, summary["budget"]["planned_minutes"]
    console.print(f"total wall time {total:.1f} min (planned: at most {planned:g} min on 2 cores)")
    if summary["slower_than_planned"]:
        console.print(
            f"[yellow]warning:[/yellow] this run took {total:.1f} min, longer than the planned {planned:g}: the "
            "machine is slower or busy. The metrics do not depend on it (every budget is steps or epochs)."
        )
