"""A model or run directory in the Hugging Face transformers layout (``lmforge export --to hf``): the weights under
Hugging Face's names (``models/convert.to_hf``), its config.json with the tokenizer's special ids, and the
tokenizer files. Compressed copies (int8, ONNX) are ``compressed.py``'s."""

from __future__ import annotations

import os
from pathlib import Path

from safetensors.torch import save_file

from lmforge.data.tokenizer import copy_tokenizer_files, load_tokenizer
from lmforge.files import atomic_write, read_json_object, write_json
from lmforge.models.convert import hf_family, to_hf
from lmforge.models.registry import CONFIG_FILE, TYPE_KEY, load_model
from lmforge.rundir.layout import check_output_dir, holds_model


def export_hf(source: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write ``source`` (a lmforge model or run directory) to ``out`` in the transformers layout."""
    src = Path(source)
    out = check_output_dir(out, inputs=[src], reusable=is_hf_export)
    model = load_model(src)
    hf_family(model.cfg)  # refused before anything is written
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
    with atomic_write(out / "model.safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
    write_json(out / "config.json", hf_cfg)
    copy_tokenizer_files(src, out)
    return out


def is_hf_export(directory: Path) -> bool:
    """An earlier export: a Hugging Face config.json (no lmforge model type) and nothing of a lmforge run."""
    config = directory / CONFIG_FILE
    if not config.is_file() or holds_model(directory) != f"a model directory ({CONFIG_FILE})":
        return False
    return TYPE_KEY not in read_json_object(config, what="config file")
