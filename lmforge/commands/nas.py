"""``lmforge nas``: architecture search under a latency budget on this machine (``nas/run.py``)."""

from __future__ import annotations

from lmforge.commands._console import console, print_table
from lmforge.nas.config import NASConfig

Config = NASConfig


def run(cfg: NASConfig) -> None:
    from lmforge.nas.run import run_nas

    found = run_nas(cfg)
    metric = found["metric"]
    if "supernet" in found:
        rows = [
            [r["arch"], f"{r['dev']:.4f}", f"{r['measured_ms']:.2f}", f"{r['predicted_ms']:.2f}", f"{r['params']:,}"]
            for r in found["supernet"]["pareto"]
        ]
        header = ["architecture", f"dev {metric}", "measured ms", "predicted ms", "params"]
        print_table(f"Pareto front ({cfg.out}/report.md, {cfg.out}/pareto.png)", header, rows)
    if "retrained" in found:
        rows = []
        for label, r in found["retrained"].items():
            test = "-" if metric not in r["test"] else f"{r['test'][metric]:.4f}"
            rows.append([label, r["arch"], f"{r['measured_ms']:.2f}", f"{r['dev'][metric]:.4f}", test])
        header = ["pick", "architecture", "measured ms", f"dev {metric}", f"test {metric}"]
        print_table("retrained from scratch", header, rows)
    lat = found["latency_model"]
    error = 100 * lat["held_out_median_relative_error"]
    console.print(f"latency model: median relative error {error:.1f}% on {len(lat['held_out'])} held-out architectures")
