"""``lmforge convert --from-hf DIR``: import a Hugging Face model directory (``models/convert.py``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from lmforge.commands._console import console

log = logging.getLogger(__name__)


@dataclass
class Config:
    """Import a Hugging Face model directory (BERT, GPT-2, Llama, Qwen2; safetensors) into lmforge."""

    from_hf: str
    """Hugging Face model directory: config.json, model.safetensors, tokenizer files."""
    out: str
    """lmforge model directory to write."""


def convert(cfg: Config) -> Path:
    from lmforge.data.tokenizer import copy_tokenizer_files
    from lmforge.models.convert import from_hf, read_hf_dir
    from lmforge.models.registry import build_model, save_model

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


def run(cfg: Config) -> None:
    console.print(f"[green]wrote[/green] lmforge model directory {convert(cfg)}")
