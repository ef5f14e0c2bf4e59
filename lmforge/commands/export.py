"""``lmforge export RUN_DIR --to hf|onnx``: a lmforge model or run directory in the transformers layout, or a
BERT run as an ONNX encoder graph plus its head and tokenizer (run by ONNX Runtime: inference/onnx.py)."""

from __future__ import annotations

import os
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
    from safetensors.torch import save_file

    from lmforge.data.tokenizer import copy_tokenizer_files, load_tokenizer
    from lmforge.files import write_json
    from lmforge.models.convert import to_hf
    from lmforge.models.registry import load_model

    src, out = Path(cfg.run_dir), Path(cfg.out)
    model = load_model(src)
    token_ids: dict[str, int | None] = {}
    if (src / "tokenizer.json").is_file():
        tok = load_tokenizer(src)
        token_ids = {
            "pad": tok.token_id("pad"),
            "bos": tok.token_id("bos") or tok.token_id("eos"),
            "eos": tok.token_id("eos"),
        }
        if tok.kind == "wordpiece":
            token_ids["bos"], token_ids["eos"] = tok.token_id("cls"), tok.token_id("sep")
    hf_cfg, tensors = to_hf(model.cfg, model.state_dict(), token_ids=token_ids)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "model.safetensors.tmp"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out / "model.safetensors")
    write_json(out / "config.json", hf_cfg)
    copy_tokenizer_files(src, out)
    return out


def export_onnx(cfg: Config) -> Path:
    from lmforge.inference.onnx import OPSET
    from lmforge.inference.onnx import export_onnx as write_graph
    from lmforge.models.registry import load_model
    from lmforge.runs.run_dir import write_compressed

    def write(out: Path) -> dict:
        write_graph(load_model(cfg.run_dir), out, int8=cfg.int8)
        return {}

    precision = "int8" if cfg.int8 else "fp32"
    backend = {"backend": "onnx", "precision": precision, "opset": OPSET, "runtime": "onnxruntime"}
    return write_compressed(cfg.run_dir, cfg.out, backend, write)


def run(cfg: Config) -> None:
    what = "ONNX copy" if cfg.to == "onnx" else "Hugging Face model directory"
    console.print(f"[green]wrote[/green] {what} {export(cfg)}")
