"""Import Hugging Face model directories into lmforge and export lmforge ones back.

``convert_from_hf`` reads a Hugging Face directory (config.json + safetensors + tokenizer files),
maps the weights through ``models/convert.py`` and writes a lmforge model directory.
``export_to_hf`` does the reverse: the result loads with ``transformers.AutoModelForMaskedLM`` /
``AutoModelForCausalLM`` and ``AutoTokenizer`` unchanged and reproduces lmforge's logits.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import tyro
from safetensors.torch import save_file

from lmforge.config import write_json
from lmforge.data.tokenizer import copy_tokenizer_files, load_tokenizer
from lmforge.models.convert import from_hf, read_hf_dir, to_hf
from lmforge.models.registry import build_model, load_model, save_model

log = logging.getLogger(__name__)


@dataclass
class ConvertConfig:
    """Import a Hugging Face model directory (BERT, GPT-2, Llama, Qwen2; safetensors) into lmforge."""

    from_hf: str
    """Hugging Face model directory: config.json, model.safetensors, tokenizer files."""
    out: str
    """lmforge model directory to write."""


@dataclass
class ExportConfig:
    """Export a lmforge model directory to another format."""

    run_dir: tyro.conf.Positional[Annotated[str, tyro.conf.arg(metavar="RUN_DIR")]]
    """lmforge model or run directory to export."""
    out: str
    """Directory to write."""
    to: Literal["hf"] = "hf"
    """Target format: hf = Hugging Face transformers layout."""


def convert_from_hf(cfg: ConvertConfig) -> Path:
    src, out = Path(cfg.from_hf), Path(cfg.out)
    hf_cfg, tensors = read_hf_dir(src)
    model_cfg, state = from_hf(hf_cfg, tensors, source=str(src))
    model = build_model(model_cfg)
    model.load_state_dict(state)
    save_model(model, out)
    copied = copy_tokenizer_files(src, out)
    if "tokenizer.json" not in copied:
        log.warning("%s has no tokenizer.json: the imported model has no tokenizer", src)
    return out


def export_to_hf(cfg: ExportConfig) -> Path:
    src, out = Path(cfg.run_dir), Path(cfg.out)
    model = load_model(src)
    token_ids: dict[str, int | None] = {}
    if (src / "tokenizer.json").is_file():
        tok = load_tokenizer(src)
        token_ids = {"pad": tok.token_id("pad"), "bos": tok.token_id("bos") or tok.token_id("eos"),
                     "eos": tok.token_id("eos")}  # fmt: skip
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
