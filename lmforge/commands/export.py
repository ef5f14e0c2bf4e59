"""``lmforge export RUN_DIR --to hf|gguf|onnx``: a lmforge model or run directory in the transformers layout, a
decoder as one GGUF file that llama.cpp runs, or a BERT run as an ONNX encoder graph plus its head and tokenizer
(run by ONNX Runtime: inference/onnx.py)."""

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
    """Directory to write (--to gguf: the .gguf file)."""
    to: Literal["hf", "gguf", "onnx"] = "hf"
    """Target format: hf = Hugging Face transformers layout; gguf = one llama.cpp file of a decoder (GPT-2, Llama,
    Qwen2 or Gemma 3 family, lmforge's own GPTs included) with its tokenizer and chat template; onnx = a copy of a
    classify / NER / embed run whose encoder is an ONNX graph (dynamic batch and length) that predict, evaluate
    and serve run with ONNX Runtime."""
    int8: bool = False
    """With --to onnx: quantize the graph with ONNX Runtime's dynamic int8 quantizer."""
    merge: str | None = None
    """With --to hf or gguf: a LoRA adapter directory (adapter_config.json + adapter_model.safetensors, PEFT's
    format) made for RUN_DIR, folded into the weights before they are written."""
    quant: Literal["f16", "q8_0", "q4_0"] | None = None
    """With --to gguf: the matrices' type, f16 (default), q8_0, or q4_0 (embedding and output in q8_0); norms and
    biases stay f32."""


def export(cfg: Config) -> Path:
    if cfg.quant is not None and cfg.to != "gguf":
        raise UserError(f"--quant applies to --to gguf only (this export is --to {cfg.to})")
    if cfg.int8 and cfg.to != "onnx":
        raise UserError("--int8 applies to --to onnx only (for int8 PyTorch weights: lmforge quantize)")
    if cfg.merge is not None and cfg.to == "onnx":
        raise UserError("--merge applies to --to hf and --to gguf (merge, then export the merged model to ONNX)")
    if cfg.to == "onnx":
        return export_onnx(cfg)
    if cfg.to == "gguf":
        from lmforge.rundir.export import export_gguf

        return export_gguf(cfg.run_dir, cfg.out, quant=cfg.quant or "f16", merge=cfg.merge)
    from lmforge.rundir.export import export_hf

    return export_hf(cfg.run_dir, cfg.out, merge=cfg.merge)


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
    what = {"onnx": "ONNX copy", "gguf": "GGUF file"}.get(cfg.to, "Hugging Face model directory")
    console.print(f"[green]wrote[/green] {what} {export(cfg)}")
