"""A model or run directory in the Hugging Face transformers layout (``lmforge export --to hf``): the weights under
Hugging Face's names (``models/convert.to_hf``), its config.json with the tokenizer's special ids, and the
tokenizer files; or a decoder as one GGUF file for llama.cpp (``lmforge export --to gguf``): the same Hugging Face
tensors renamed and transformed as llama.cpp's converter does (``models/convert.hf_as_gguf``), the tokenizer and chat
template as metadata (``data/gguf_vocab.gguf_tokenizer_metadata``), quantized and written by ``models/gguf.write_gguf``.
Compressed copies (int8, ONNX) are ``compressed.py``'s."""

from __future__ import annotations

import os
from pathlib import Path

from safetensors.torch import save_file

from lmforge.data.tokenizer import copy_tokenizer_files, load_tokenizer
from lmforge.errors import UserError
from lmforge.files import atomic_write, read_json_object, write_json
from lmforge.models.convert import hf_family, to_hf
from lmforge.models.registry import CONFIG_FILE, TYPE_KEY, load_model
from lmforge.rundir.layout import check_output_dir, check_output_files, holds_model


def export_hf(source: str | os.PathLike, out: str | os.PathLike, *, merge: str | os.PathLike | None = None) -> Path:
    """Write ``source`` (a lmforge model or run directory) to ``out`` in the transformers layout; with ``merge``, the
    LoRA adapter directory (PEFT's files) folded into its weights first."""
    src = Path(source)
    out = check_output_dir(out, inputs=[src, merge], reusable=is_hf_export)
    hf_cfg, tensors = _as_hf(src, merge)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(out / "model.safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
    write_json(out / "config.json", hf_cfg)
    copy_tokenizer_files(src, out)
    return out


def export_gguf(
    source: str | os.PathLike, out: str | os.PathLike, *, quant: str, merge: str | os.PathLike | None = None
) -> Path:
    """Write ``source`` (a lmforge decoder's model or run directory) to the GGUF file ``out``, matrices in ``quant``
    (``models/gguf.EXPORT_QUANTS``), with ``merge``'s LoRA adapter folded in. Everything is checked (the family, the
    tokenizer, the adapter's base) before the file is written."""
    from lmforge.data.gguf_vocab import gguf_tokenizer_metadata
    from lmforge.models.convert import hf_as_gguf
    from lmforge.models.gguf import EXPORT_QUANTS, write_gguf

    src = Path(source)
    if quant not in EXPORT_QUANTS:
        raise UserError(f"--quant {quant!r}: must be one of {', '.join(EXPORT_QUANTS)}")
    (out,) = check_output_files([out], inputs=[src, *([merge] if merge else [])], flag="--out")
    if out.suffix != ".gguf":
        raise UserError(f"--out {out}: name the GGUF file to write, ending in .gguf (e.g. {out.with_suffix('.gguf')})")
    if not (src / "tokenizer.json").is_file():
        raise UserError(f"{src}: has no tokenizer.json; a GGUF file carries its tokenizer, so llama.cpp needs one")
    hf_cfg, tensors = _as_hf(src, merge)
    arch, metadata, gguf_tensors = hf_as_gguf(hf_cfg, tensors)
    metadata.update(gguf_tokenizer_metadata(load_tokenizer(src), hf_cfg["vocab_size"], str(src / "tokenizer.json")))
    return write_gguf(out, arch, metadata, gguf_tensors, quant=quant)


def _as_hf(src: Path, merge: str | os.PathLike | None = None) -> tuple[dict, dict]:
    """The Hugging Face config and tensors of a lmforge model or run directory (its family checked first), with the
    LoRA adapter directory ``merge`` folded into the weights (``models/lora.merge_lora``)."""
    model = load_model(src)
    hf_family(model.cfg)  # refused before anything is written
    if merge is not None:
        from lmforge.models.lora import load_adapter, merge_lora

        if not Path(merge).is_dir():
            raise UserError(f"--merge {merge}: not a directory; name an adapter directory (adapter_config.json)")
        load_adapter(model, merge)
        merge_lora(model)
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
    return to_hf(model.cfg, model.state_dict(), token_ids=token_ids)


def is_hf_export(directory: Path) -> bool:
    """An earlier export: a Hugging Face config.json (no lmforge model type) and nothing of a lmforge run."""
    config = directory / CONFIG_FILE
    if not config.is_file() or holds_model(directory) != f"a model directory ({CONFIG_FILE})":
        return False
    return TYPE_KEY not in read_json_object(config, what="config file")
