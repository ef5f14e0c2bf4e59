"""``lmforge export RUN_DIR --to hf|onnx``: a lmforge model or run directory in the transformers layout, or a
BERT run as an ONNX encoder graph plus its head and tokenizer (run by ONNX Runtime: inference/onnx.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import tyro

from lmforge.commands._console import console
from lmforge.errors import UserError


@dataclass
class Config:
    """Export a lmforge model directory to another format."""

    run_dir: tyro.conf.Positional[Annotated[str, tyro.conf.arg(metavar="RUN_DIR")]]
    """lmforge model or run directory to export."""
    out: str
    """Directory to write."""
    to: Literal["hf", "onnx"] = "hf"
    """Target format: hf = Hugging Face transformers layout; onnx = a copy of a classify / NER / embed run
    whose encoder is an ONNX graph (dynamic batch and length) that predict, evaluate and serve run with
    ONNX Runtime."""
    int8: bool = False
    """With --to onnx: quantize the graph with ONNX Runtime's dynamic int8 quantizer."""


def export(cfg: Config) -> Path:
    if cfg.to == "onnx":
        return export_onnx(cfg)
    if cfg.int8:
        raise UserError("--int8 applies to --to onnx only (for int8 PyTorch weights: lmforge quantize)")
    from lmforge.rundir.export import export_hf

    return export_hf(cfg.run_dir, cfg.out)


def export_onnx(cfg: Config) -> Path:
    from lmforge.inference.onnx import OPSET
    from lmforge.inference.onnx import export_onnx as write_graph
    from lmforge.models.registry import load_model
    from lmforge.rundir.compressed import write_compressed

    def write(out: Path) -> dict:
        write_graph(load_model(cfg.run_dir), out, int8=cfg.int8)
        return {}

    precision = "int8" if cfg.int8 else "fp32"
    backend = {"backend": "onnx", "precision": precision, "opset": OPSET, "runtime": "onnxruntime"}
    return write_compressed(cfg.run_dir, cfg.out, backend, write)


def run(cfg: Config) -> None:
    what = "ONNX copy" if cfg.to == "onnx" else "Hugging Face model directory"
    console.print(f"[green]wrote[/green] {what} {export(cfg)}")
