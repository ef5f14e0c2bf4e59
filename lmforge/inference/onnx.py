"""A BERT encoder as an ONNX graph, run by ONNX Runtime (``lmforge export --to onnx``, ``predict``, ``serve``).

The graph is the encoder alone: ``input_ids``, ``attention_mask`` and (when the model has token types)
``token_type_ids``, all int64 (batch, length) with both dimensions dynamic, to ``hidden`` (batch, length,
d_model) float32. It is exported by ``torch.onnx.export`` with the dynamo exporter (torch.export, then
onnxscript's graph optimizations). The task heads stay in PyTorch on top of ``OnnxEncoder`` (they are a
few small matrices, and a CRF's Viterbi is a loop), so every task's inference code runs unchanged over
either backend. ``int8=True`` quantizes the exported graph with ONNX Runtime's dynamic quantizer (int8
weights per output channel, int8 activations per batch: MatMulInteger).
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from lmforge.errors import UserError
from lmforge.files import atomic_write
from lmforge.models.bert import Bert, BertConfig
from lmforge.models.registry import read_config

ONNX_FILE = "encoder.onnx"
OPSET = 18
INSTALL = "ONNX support needs the deploy extra: pip install 'lmforge[deploy]' (onnx, onnxscript, onnxruntime)"


def _inputs(cfg: BertConfig) -> list[str]:
    return ["input_ids", "attention_mask"] + (["token_type_ids"] if cfg.type_vocab_size else [])


class _Graph(nn.Module):
    """The encoder with positional inputs, as the exporter needs them."""

    def __init__(self, encoder: Bert) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        return self.encoder(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)


def export_onnx(encoder: Bert, directory: str | os.PathLike, *, int8: bool = False) -> Path:
    """Write ``encoder.onnx`` (fp32, or int8 after ONNX Runtime's dynamic quantization) into ``directory``."""
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise UserError(INSTALL) from e
    if not isinstance(encoder, Bert):
        raise UserError(f"ONNX export takes a BERT encoder; this is a {type(encoder).__name__}")
    path = Path(directory) / ONNX_FILE
    with atomic_write(path, suffix=".onnx") as tmp:
        _write_graph(encoder, tmp, int8=int8)
    return path


def _write_graph(encoder: Bert, tmp: Path, *, int8: bool) -> None:
    names = _inputs(encoder.cfg)
    example = torch.tensor([[2, 5, 6, 3], [2, 7, 3, 0]])
    args = (example, (example > 0).long()) + ((torch.zeros_like(example),) if encoder.cfg.type_vocab_size else ())
    batch, length = torch.export.Dim("batch"), torch.export.Dim("length")
    graph = _Graph(encoder.eval())
    with _quiet():
        torch.onnx.export(
            graph,
            args,
            str(tmp),
            dynamo=True,
            input_names=names,
            output_names=["hidden"],
            dynamic_shapes={name: {0: batch, 1: length} for name in names},
            opset_version=OPSET,
            external_data=False,
            optimize=True,
            verbose=False,
        )
    if int8:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        fp32 = tmp.with_name(tmp.name.removesuffix(".onnx") + "-fp32.onnx")
        os.replace(tmp, fp32)
        try:
            with _quiet():
                quantize_dynamic(str(fp32), str(tmp), weight_type=QuantType.QInt8, per_channel=True)
        finally:
            fp32.unlink(missing_ok=True)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporter's and quantizer's progress lines and warnings (INFO on the root logger) kept off the console."""
    loggers = {logging.getLogger(): logging.ERROR, logging.getLogger("torch.onnx"): logging.ERROR}
    levels = {logger: logger.level for logger in loggers}
    for logger, level in loggers.items():
        logger.setLevel(level)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in levels.items():
            logger.setLevel(level)


class OnnxEncoder(nn.Module):
    """An ONNX Runtime session with the call signature of ``Bert.forward`` (no gradients, CPU).

    ``select`` gives the rows asked for, gathered from the full output (the graph computes every row).
    """

    def __init__(self, path: str | os.PathLike, cfg: BertConfig, *, threads: int | None = None) -> None:
        super().__init__()
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise UserError(INSTALL) from e
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.cfg, self.path = cfg, Path(path)
        found, expected = [i.name for i in self.session.get_inputs()], _inputs(cfg)
        if found != expected:
            raise UserError(f"{path}: graph inputs {found} do not match config.json (expected {expected})")

    def forward(
        self,
        input_ids: Tensor,
        *,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
        select: Tensor | None = None,
    ) -> Tensor:
        if position_ids is not None:
            raise UserError("the ONNX encoder takes no position_ids (positions are 0..length-1)")
        B, T = input_ids.shape
        if self.cfg.max_seq_len < T:
            raise UserError(f"{T} tokens are past max_seq_len={self.cfg.max_seq_len}")
        mask = torch.ones(B, T, dtype=torch.long) if attention_mask is None else attention_mask
        feeds = {"input_ids": _int64(input_ids), "attention_mask": _int64(mask)}
        if self.cfg.type_vocab_size:
            types = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
            feeds["token_type_ids"] = _int64(types)
        (hidden,) = self.session.run(["hidden"], feeds)
        out = torch.from_numpy(hidden)
        return out if select is None else out.flatten(0, 1)[select.cpu()]


def _int64(t: Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().cpu().numpy().astype(np.int64, copy=False))


def load_onnx(directory: str | os.PathLike) -> OnnxEncoder:
    """The ONNX encoder of ``directory`` (config.json + encoder.onnx)."""
    cfg = read_config(directory)
    if not isinstance(cfg, BertConfig):
        raise UserError(f"{directory}/config.json: the ONNX backend runs BERT encoders only")
    path = Path(directory) / ONNX_FILE
    if not path.is_file():
        raise UserError(f"{directory}: no {ONNX_FILE} (write one with `lmforge export --to onnx`)")
    return OnnxEncoder(path, cfg)
