"""GGUF files, llama.cpp's model format: read (checked before any work) and dequantized to float32.

A GGUF file (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md) holds key-value metadata (the
architecture and its hyper-parameters under ``ARCH.*``, the tokenizer under ``tokenizer.ggml.*``, the chat
template as ``tokenizer.chat_template``) and tensors, each of one ``ggml`` type: plain (F32, F16, BF16) or
quantized in blocks (Q4_0 ... Q8_0, and the "K" super-blocks Q4_K, Q5_K, Q6_K of the Q4_K_M / Q5_K_M mixes).
The file is read with the ``gguf`` package that llama.cpp publishes (``GGUFReader`` maps it into memory,
``gguf.quants.dequantize`` turns each type back into float32): a tensor is only read when it is converted, one
at a time, so converting never holds the file twice.

``open_gguf`` checks, before anything is converted, that the file is GGUF, that it is whole (every tensor's
bytes lie inside it), and that every tensor's type is one this module reads; ``metadata`` gives the key-value
pairs as Python values; ``dequantized`` one tensor in PyTorch's (rows, columns) order. The names and the
transforms llama.cpp applied at conversion (the Llama Q/K row permutation, Gemma's +1 on norm weights) are
undone in ``models/convert.py``, the one place foreign names live.

``write_gguf`` writes one (``lmforge export --to gguf``) with ``gguf.GGUFWriter`` and ``gguf.quants.quantize``,
the writer and the reference quantizers llama.cpp's own ``convert_hf_to_gguf.py`` uses. ``EXPORT_QUANTS``: ``f16``
(every matrix F16), ``q8_0`` (every matrix Q8_0) and ``q4_0`` (the blocks' matrices Q4_0, the embedding and output
matrices Q8_0, since they are the most sensitive to rounding, as ``llama-quantize`` keeps them in a wider type);
norms and biases stay F32, and a matrix whose rows are not a whole number of 32-value blocks falls back to F16, as
llama.cpp's converter does. The file is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.errors import UserError

SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K")
"""The tensor types read here: those llama.cpp's common files use (a Q4_K_M file also holds Q5_0, Q6_K and
Q8_0 tensors where a row's width is not a multiple of 256)."""

EXPORT_QUANTS = ("f16", "q8_0", "q4_0")
"""The tensor types ``write_gguf`` writes (see the module docstring)."""

_MAGIC = b"GGUF"
ROWS_AT_ONCE = 4096


@dataclass
class GGUFFile:
    """An opened, checked GGUF file: its path, the ``gguf`` reader, and the tensors by name."""

    path: Path
    reader: Any  # gguf.GGUFReader
    tensors: dict[str, Any]  # name -> gguf.ReaderTensor

    @property
    def architecture(self) -> str:
        return str(self.value("general.architecture"))

    def value(self, key: str, default: Any = None) -> Any:
        """One metadata value as a Python value (str, int, float, bool or a list of them), or ``default``."""
        field = self.reader.fields.get(key)
        return default if field is None else field.contents()

    def take_metadata(self, prefix: str) -> dict[str, Any]:
        """Every metadata value whose key starts with ``prefix``, as Python values, then dropped from the reader:
        the ``gguf`` reader keeps one numpy view per string of an array (a 262,144-token vocabulary is ~700 MB of
        views), so the tokenizer's keys are taken once and let go before the weights are converted."""
        keys = [k for k in self.reader.fields if k.startswith(prefix)]
        values = {k: self.reader.fields[k].contents() for k in keys}
        for k in keys:
            del self.reader.fields[k]
        return values

    def require(self, key: str) -> Any:
        """A metadata value the conversion cannot do without; a UserError naming the key when it is missing."""
        field = self.reader.fields.get(key)
        if field is None:
            raise UserError(f"{self.path}: the GGUF metadata has no {key!r}, which a {self.architecture} model needs")
        return field.contents()

    def dequantized(self, name: str) -> torch.Tensor:
        """Tensor ``name`` as float32 in PyTorch's order (GGUF lists dimensions innermost first), dequantized
        ``ROWS_AT_ONCE`` rows at a time into one new array, so that dequantizing a large matrix (Gemma's
        262,144-row embedding) holds no full-size temporaries; F32 data is copied out of the memory-mapped file."""
        from gguf import dequantize

        t = self.tensors[name]
        shape = tuple(int(n) for n in reversed(t.shape))
        data = t.data.reshape(shape[0], -1) if len(shape) > 1 else t.data.reshape(1, -1)
        out = np.empty((data.shape[0], int(t.shape[0])), dtype=np.float32)
        for start in range(0, data.shape[0], ROWS_AT_ONCE):
            out[start : start + ROWS_AT_ONCE] = dequantize(data[start : start + ROWS_AT_ONCE], t.tensor_type)
        return torch.from_numpy(out.reshape(shape))


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    """Open ``path`` and check it before any work: a GGUF file, whole, with only ``SUPPORTED_TYPES`` tensors;
    a UserError naming the file and what is wrong otherwise."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found" if not path.exists() else f"{path}: not a file")
    with path.open("rb") as f:
        head = f.read(4)
    if head != _MAGIC:
        raise UserError(f"{path}: not a GGUF file (it starts with {head!r}, a GGUF file with {_MAGIC!r})")
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except (ValueError, IndexError, KeyError, OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: a truncated or corrupt GGUF file ({type(e).__name__}: {e})") from None
    size = path.stat().st_size
    tensors = {}
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size:
            raise UserError(f"{path}: truncated: tensor {t.name!r} ends at byte {end:,}, the file has {size:,} bytes")
        kind = t.tensor_type.name
        if kind not in SUPPORTED_TYPES:
            raise UserError(
                f"{path}: tensor {t.name!r} is {kind}, a type not read here; supported: {', '.join(SUPPORTED_TYPES)}"
            )
        tensors[t.name] = t
    return GGUFFile(path, reader, tensors)


_FILE_TYPES = {"f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0", "q4_0": "MOSTLY_Q4_0"}


def _tensor_type(name: str, value: np.ndarray, quant: str):
    from gguf import GGMLQuantizationType as T

    if value.ndim < 2:
        return T.F32
    if quant == "f16" or value.shape[-1] % 32:
        return T.F16
    if quant == "q4_0" and name.startswith("blk."):
        return T.Q4_0
    return T.Q8_0


def write_gguf(
    path: str | os.PathLike, arch: str, metadata: dict[str, Any], tensors: dict[str, torch.Tensor], *, quant: str
) -> Path:
    """Write a GGUF file: ``general.*`` keys, then ``metadata`` (typed by value: bool, int as uint32, float as
    float32, str, and lists of str / int / float), then ``tensors`` (PyTorch order) quantized as ``quant`` says."""
    import gguf

    from lmforge.files import atomic_write

    if quant not in EXPORT_QUANTS:
        raise UserError(f"--quant {quant!r}: must be one of {', '.join(EXPORT_QUANTS)}")
    path = Path(path)
    logging.getLogger("gguf").setLevel(logging.WARNING)  # the writer logs each step at INFO, temporary name included
    with atomic_write(path, suffix=".gguf") as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch)
        writer.add_name(path.stem)
        writer.add_file_type(int(getattr(gguf.LlamaFileType, _FILE_TYPES[quant])))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for key, value in metadata.items():
            _add_value(writer, key, value)
        for name, tensor in tensors.items():
            value = tensor.detach().float().numpy()
            kind = _tensor_type(name, value, quant)
            if kind == gguf.GGMLQuantizationType.F16:
                writer.add_tensor(name, value.astype(np.float16))
            elif kind == gguf.GGMLQuantizationType.F32:
                writer.add_tensor(name, value)
            else:
                writer.add_tensor(name, gguf.quants.quantize(value, kind), raw_dtype=kind)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path


def _add_value(writer, key: str, value: Any) -> None:
    from gguf import GGUFValueType as V

    def kind(x: Any) -> V:
        if isinstance(x, bool):
            return V.BOOL
        if isinstance(x, int):
            return V.UINT32 if x >= 0 else V.INT32
        if isinstance(x, float):
            return V.FLOAT32
        if isinstance(x, str):
            return V.STRING
        raise TypeError(f"GGUF metadata {key}: no GGUF type for {type(x).__name__}")

    if isinstance(value, list):
        sub = V.INT32 if value and kind(value[0]) in (V.UINT32, V.INT32) else kind(value[0]) if value else V.STRING
        writer.add_key_value(key, value, V.ARRAY, sub_type=sub)
    else:
        writer.add_key_value(key, value, kind(value))
