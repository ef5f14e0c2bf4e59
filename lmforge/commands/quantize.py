"""``lmforge quantize --model RUN --out DIR``: a copy of a BERT run with int8 weights for CPU inference."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lmforge.commands._console import console


@dataclass
class Config:
    """Write a copy of a classify / NER / embed run (or a pretrained BERT directory) whose encoder has int8
    weights and int8 dynamic activations (torch.ao kernels, inference/int8.py); predict, evaluate and
    serve load the copy as they load the run."""

    model: str
    """Run directory written by `lmforge finetune classify|ner|embed`, or a pretrained BERT directory."""
    out: str
    """Directory to write (new, empty, or an earlier compressed copy)."""


def quantize(cfg: Config) -> Path:
    from lmforge.inference.int8 import ENGINE, quantize_encoder, save_int8
    from lmforge.models.registry import load_model
    from lmforge.rundir.compressed import write_compressed

    def write(out: Path) -> dict:
        encoder = load_model(cfg.model)
        names = quantize_encoder(encoder)
        save_int8(encoder, out)
        return {"quantized": names}

    return write_compressed(cfg.model, cfg.out, {"backend": "int8", "precision": "int8", "engine": ENGINE}, write)


def run(cfg: Config) -> None:
    console.print(f"[green]wrote[/green] int8 copy {quantize(cfg)}")
