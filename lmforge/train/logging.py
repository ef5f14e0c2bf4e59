"""What a run reports: progress bar, metrics.jsonl, TensorBoard, curves as PNG, compute summary.

Only the main process writes. ``metrics.jsonl`` holds one JSON object per logged step or
evaluation; on resume, records past the checkpoint's step are dropped so the file reads as one
uninterrupted run. MFU (model FLOPs utilisation, Chowdhery et al., 2022) compares the counted
training FLOPs per second with the device's peak matmul throughput, measured once per machine
and dtype (cached in ``~/.cache/lmforge/peak_flops.json``) unless given.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from lmforge.files import atomic_write, write_json, write_lines
from lmforge.ops.cpu_features import cpu_name

log = logging.getLogger("lmforge.train")
METRICS = "metrics.jsonl"


def measure_peak_flops(device: torch.device, dtype: torch.dtype, *, size: int = 2048, seconds: float = 1.0) -> float:
    """Matmul FLOP/s of this device at ``dtype`` (a square ``size`` matmul, best of a short run)."""
    cache = Path(os.environ.get("LMFORGE_CACHE", Path.home() / ".cache" / "lmforge")) / "peak_flops.json"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    key = f"{device.type}:{name}:{torch.get_num_threads()}:{dtype}"
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    if key in known:
        return float(known[key])
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = max(best, 2 * size**3 / (time.perf_counter() - start))
    known[key] = best
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        write_json(cache, known)
    except OSError:
        pass  # a read-only home only costs a re-measurement next time
    return best


def _record_step(line: str, path: Path) -> float:
    """The step of one metrics.jsonl record; a record cut off by a kill (the last line, half written) is dropped
    with a warning (it reads as after every checkpoint)."""
    try:
        return json.loads(line).get("step", 0)
    except json.JSONDecodeError:
        log.warning("%s: dropping a record cut off mid-line (the run was killed while writing it)", path)
        return float("inf")


class RunLogger:
    """Progress bar + metrics.jsonl + TensorBoard for the main process; silent elsewhere."""

    def __init__(self, run_dir: Path, *, main: bool, total_steps: int, start_step: int, progress: bool) -> None:
        self.run_dir, self.main = run_dir, main
        self.tb = None
        self.bar = None
        if not main:
            return
        path = run_dir / METRICS
        if path.exists():  # resume: keep what the checkpoint had seen, drop the rest
            kept = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            kept = [line for line in kept if _record_step(line, path) <= start_step]
            write_lines(path, (line + "\n" for line in kept))
        self.metrics = path.open("a", encoding="utf-8")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=start_step + 1)
        except ImportError:
            log.warning("tensorboard is not installed: no event files (pip install tensorboard)")
        if progress:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("[bold]train[/bold]"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.description}"),
                TimeRemainingColumn(),
            )
            self.bar.start()
            self.task = self.bar.add_task("", total=total_steps, completed=start_step)

    def record(self, kind: str, step: int, values: dict[str, Any]) -> None:
        if not self.main:
            return
        self.metrics.write(json.dumps({"kind": kind, "step": step, **values}) + "\n")
        self.metrics.flush()
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{kind}/{k}", v, step)

    def progress(self, step: int, text: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step, description=text)

    def info(self, message: str) -> None:
        if self.main:
            if self.bar is not None:
                self.bar.console.print(message)
            else:
                log.info(message)

    def close(self) -> None:
        if not self.main:
            return
        if self.bar is not None:
            self.bar.stop()
        if self.tb is not None:
            self.tb.close()
        self.metrics.close()


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / METRICS
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_curves(run_dir: Path) -> list[Path]:
    """loss.png (train and validation loss) and lr.png from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    written = []
    if train:
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train", lw=1)
        with_loss = [r for r in evals if "loss" in r]
        if with_loss:
            ax.plot([r["step"] for r in with_loss], [r["loss"] for r in with_loss], "o-", label="validation")
        ax.set(xlabel="step", ylabel="loss (nats per target)", title=f"loss — {run_dir.name}")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left")
        # a task scored by another dev metric (BLEU, F1, accuracy) gets it on a second axis
        other = next((k for k in ("bleu", "f1", "accuracy", "perplexity") if evals and k in evals[-1]), None)
        if other:
            twin = ax.twinx()
            points = [r for r in evals if other in r]
            twin.plot(
                [r["step"] for r in points],
                [r[other] for r in points],
                "s--",
                color="tab:green",
                label=f"validation {other}",
            )
            twin.set_ylabel(f"validation {other}")
            twin.legend(loc="center right")
        fig.tight_layout()
        with atomic_write(run_dir / "loss.png", suffix=".png") as tmp:
            fig.savefig(tmp, dpi=110)
        plt.close(fig)
        fig, ax = plt.subplots(figsize=(7, 3))
        ax.plot([r["step"] for r in train], [r["lr"] for r in train])
        ax.set(xlabel="step", ylabel="learning rate", title="learning-rate schedule")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        with atomic_write(run_dir / "lr.png", suffix=".png") as tmp:
            fig.savefig(tmp, dpi=110)
        plt.close(fig)
        written = [run_dir / "loss.png", run_dir / "lr.png"]
    return written
