"""``lmforge embed``: sentence vectors of a file of texts (``OUT.npy``, float32, L2-normalised rows) and their
ids (``OUT.ids.txt``: each row's ``id`` field, else its file:line), from a SimCSE run or any lmforge BERT."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lmforge.commands._console import console
from lmforge.errors import UserError


@dataclass
class Config:
    """Embed texts with a run directory from `lmforge finetune embed` (or any lmforge BERT: first-token vectors)."""

    model: str
    """Run directory (or a BERT model directory)."""
    input: str
    """.txt (one text per line), or .jsonl / .csv / .tsv with a 'text' field (and optionally 'id')."""
    output: str
    """Output prefix: writes OUTPUT.npy (float32, L2-normalised rows) and OUTPUT.ids.txt."""
    batch_size: int = 64
    """Texts per forward pass."""
    skip_bad_rows: bool = False
    """Skip malformed rows instead of stopping at the first."""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise UserError(f"--batch-size {self.batch_size}: must be >= 1")


def embed(cfg: Config) -> tuple[Path, int]:
    """Write the vectors and ids; returns the .npy path and the number of rows."""
    import numpy as np
    import torch

    from lmforge.data.readers import read_labelled
    from lmforge.files import atomic_write, write_text
    from lmforge.rundir import load_run
    from lmforge.rundir.layout import check_output_files

    check_output_files([cfg.output + ".npy", cfg.output + ".ids.txt"], inputs=[cfg.input])
    run = load_run(cfg.model, task="embed")
    task, model = run.task, run.model
    task.eval_batch_size = cfg.batch_size
    examples, _ = read_labelled(cfg.input, skip_bad_rows=cfg.skip_bad_rows, need_label=False)
    vectors = task.vectors(model, [ex["text"] for ex in examples], device=torch.device("cpu"))
    out = Path(cfg.output)
    target = out.with_name(out.name + ".npy")
    with atomic_write(target, suffix=".npy") as tmp:
        np.save(tmp, vectors)
    write_text(out.with_name(out.name + ".ids.txt"), "\n".join(ex.get("id", ex["source"]) for ex in examples) + "\n")
    return target, len(examples)


def run(cfg: Config) -> None:
    path, n = embed(cfg)
    console.print(f"[green]wrote[/green] {n} vectors to {path} (ids in {cfg.output}.ids.txt)")
