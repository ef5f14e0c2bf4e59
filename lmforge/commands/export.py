"""``lmforge export RUN_DIR --to hf``: write a lmforge model or run directory in the transformers layout."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import tyro

from lmforge.commands._console import console


@dataclass
class Config:
    """Export a lmforge model directory to another format."""

    run_dir: tyro.conf.Positional[Annotated[str, tyro.conf.arg(metavar="RUN_DIR")]]
    """lmforge model or run directory to export."""
    out: str
    """Directory to write."""
    to: Literal["hf"] = "hf"
    """Target format: hf = Hugging Face transformers layout."""


def export(cfg: Config) -> Path:
    from safetensors.torch import save_file

    from lmforge.config import write_json
    from lmforge.data.tokenizer import copy_tokenizer_files, load_tokenizer
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


def run(cfg: Config) -> None:
    console.print(f"[green]wrote[/green] Hugging Face model directory {export(cfg)}")
